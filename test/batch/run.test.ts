/**
 * convertMany, the batch runner, on real files judged by qemu-img: a directory of mixed images
 * (every source format, one unconvertible, one corrupt, one already in the target format, two
 * interrupted conversions, a missing name, a symlink and a repeated name), resuming from the
 * manifest, a done record that no longer holds, stopping through the AbortSignal, and the default
 * scheduling rule over two filesystems.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { convertMany, batchExitCode, type BatchEvent, type ImageResult } from '../../src/batch/run.js';
import { nodeBatchFileSystem, type BatchFileSystem } from '../../src/batch/files.js';
import { parseManifest, latestStates } from '../../src/batch/manifest.js';
import { qemuAvailable, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { interrupt, judgeConverted, keepOriginals, link, makeMixedImages, sha256, type Fixture } from './fixtures.js';

const tmp = withTmpDir('imgconv-batch-run-');
afterAll(() => tmp.cleanup());

function byName(results: ImageResult[]): Map<string, ImageResult> {
  return new Map(results.map((r) => [r.image, r]));
}

function journals(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.endsWith('.imgconv-journal'));
}

describe.runIf(qemuAvailable())('convertMany on a directory of mixed images', () => {
  const dir = join(tmp.dir, 'mixed');
  const manifest = join(dir, 'batch.jsonl');
  let fixtures: Fixture[] = [];
  let sums = new Map<string, string>();

  it('jobs 3: every image converted, refused with its reason, or skipped; recovered first where interrupted; duplicates once', async () => {
    mkdirSync(dir);
    fixtures = makeMixedImages(dir);
    // Two more qcow2 images, then left as interrupted conversions to QED (before and after its commit point).
    for (const n of ['interrupted.qcow2', 'finishing.qcow2']) copyFileSync(join(dir, 'plain.qcow2'), join(dir, n));
    fixtures.push({ name: 'interrupted.qcow2', qemuFormat: 'qcow2', expect: 'converted' }, { name: 'finishing.qcow2', qemuFormat: 'qcow2', expect: 'converted' });
    sums = keepOriginals(dir, fixtures);
    await interrupt(join(dir, 'interrupted.qcow2'), 'qed', 'prepared');
    await interrupt(join(dir, 'finishing.qcow2'), 'qed', 'done');
    expect(journals(dir).sort()).toEqual(['finishing.qcow2.imgconv-journal', 'interrupted.qcow2.imgconv-journal']);
    link(dir, 'plain.qcow2', 'alias.qcow2');

    const names = [...fixtures.map((f) => join(dir, f.name)), join(dir, 'alias.qcow2'), join(dir, 'plain.qcow2'), join(dir, 'missing.img')];
    const events: BatchEvent[] = [];
    const active = new Set<number>();
    let maxActive = 0;
    const report = await convertMany(names, {
      to: 'qed',
      drivers: allDrivers,
      jobs: 3,
      manifest,
      onEvent: (e) => {
        events.push(e);
        if (e.type === 'image-start') active.add(e.image.index);
        if (e.type === 'image-end') active.delete(e.image.index);
        maxActive = Math.max(maxActive, active.size);
      },
    });
    const results = byName(report.results);
    // One entry per file: the symlink and the repeated name are the same image as plain.qcow2.
    expect(report.results).toHaveLength(fixtures.length + 1);
    expect(results.get(join(dir, 'plain.qcow2'))!.aliases).toEqual([join(dir, 'alias.qcow2')]);
    expect(results.get(join(dir, 'missing.img'))).toMatchObject({ outcome: 'refused', imageState: 'untouched' });
    expect(results.get(join(dir, 'missing.img'))!.reason).toMatch(/ENOENT/);
    for (const f of fixtures) {
      const r = results.get(join(dir, f.name))!;
      expect(r.outcome, `${f.name}: ${r.reason ?? r.note ?? ''}`).toBe(f.expect);
      if (f.expect === 'converted') judgeConverted(dir, f, 'qed');
      else expect(sha256(join(dir, f.name)), `${f.name} is byte-identical`).toBe(sums.get(f.name));
    }
    expect(results.get(join(dir, 'snapshot.qcow2'))!.reason).toMatch(/internal snapshot/);
    expect(results.get(join(dir, 'corrupt.qcow2'))!.reason).toMatch(/cluster_bits = 99/);
    expect(results.get(join(dir, 'already.qed'))!.note).toBe('already qed');
    // Interrupted before its commit point: rolled back by recover, then converted by the batch.
    const inter = results.get(join(dir, 'interrupted.qcow2'))!;
    expect(inter.recovered?.action).toBe('rolled-back');
    expect(inter.report?.source.format).toBe('qcow2');
    expect(inter.note).toMatch(/^recovered first/);
    // Interrupted after it: recovery finished the conversion; nothing left to do.
    const fin = results.get(join(dir, 'finishing.qcow2'))!;
    expect(fin.recovered?.action).toBe('rolled-forward');
    expect(fin.report).toBeUndefined();
    expect(fin.note).toMatch(/finished by recovery/);
    expect(journals(dir)).toEqual([]);

    expect(report.ok).toBe(false);
    expect(report.counts).toEqual({ converted: 7, skipped: 1, refused: 3, failed: 0, 'needs-recover': 0, pending: 0 });
    expect(batchExitCode(report)).toBe(1);
    // Exactly one end per image, and never more than 3 at once.
    expect(events.filter((e) => e.type === 'image-end')).toHaveLength(report.results.length);
    expect(new Set(events.filter((e) => e.type === 'image-end').map((e) => (e as { image: { index: number } }).image.index)).size).toBe(report.results.length);
    expect(maxActive).toBeLessThanOrEqual(3);
    expect(maxActive).toBeGreaterThan(1);

    const states = latestStates(parseManifest(readFileSync(manifest, 'utf8')).records);
    for (const r of report.results) expect(states.get(r.path)!.state, r.image).toBe(r.outcome === 'converted' || r.outcome === 'skipped' ? 'done' : r.outcome);
  });

  it('a re-run with the manifest and no names: done images are checked and skipped, the rest tried again, nothing converted twice', async () => {
    const before = parseManifest(readFileSync(manifest, 'utf8')).records.length;
    // The operator restores one converted image from its pristine copy: its done record no longer holds.
    copyFileSync(join(dir, 'disk.raw.orig'), join(dir, 'disk.raw'));
    const report = await convertMany([], { to: 'qed', drivers: allDrivers, manifest });
    const results = byName(report.results);
    expect(report.results).toHaveLength(fixtures.length + 1);
    for (const f of fixtures) {
      const r = results.get(join(dir, f.name))!;
      if (f.name === 'disk.raw') {
        expect(r.outcome).toBe('converted');
        expect(r.note).toMatch(/the manifest said done, but the file is raw now; converting it again/);
      } else if (f.expect === 'refused') expect(r.outcome).toBe('refused');
      else {
        expect(r.outcome, f.name).toBe('skipped');
        expect(r.note, f.name).toBe('done in an earlier run');
      }
      if (f.expect === 'converted') judgeConverted(dir, f, 'qed');
    }
    const added = parseManifest(readFileSync(manifest, 'utf8')).records.slice(before);
    // Only disk.raw was converted again and the refused ones tried again; done images got no record at all.
    expect(added.filter((r) => r.state === 'converting').map((r) => r.given).sort()).toEqual(['disk.raw', 'snapshot.qcow2', 'corrupt.qcow2'].map((n) => join(dir, n)).sort());
    for (const f of fixtures.filter((x) => x.expect === 'converted' && x.name !== 'disk.raw')) expect(added.some((r) => r.image === join(dir, f.name))).toBe(false);
  });
});

describe.runIf(qemuAvailable())('stopping a batch through its AbortSignal', () => {
  it('the image under way rolls back, nothing new starts, the manifest says pending; a re-run converts them all', async () => {
    const dir = join(tmp.dir, 'stop');
    mkdirSync(dir);
    const fixtures = makeMixedImages(dir, { slow: [8, 8] }).filter((f) => f.expect === 'converted').slice(0, 4);
    keepOriginals(dir, fixtures);
    const manifest = join(dir, 'm.jsonl');
    const ac = new AbortController();
    const report = await convertMany(
      fixtures.map((f) => join(dir, f.name)),
      {
        to: 'qed',
        drivers: allDrivers,
        jobs: 1,
        manifest,
        signal: ac.signal,
        onEvent: (e) => {
          // Midway through the first image's data move: before its commit point.
          if (e.type === 'image-progress' && e.event.phase === 'move' && e.event.bytesDone > 0) ac.abort();
        },
      },
    );
    expect(report.interrupted).toBe(true);
    expect(report.results.map((r) => r.outcome)).toEqual(['pending', 'pending', 'pending', 'pending']);
    expect(report.results[0]!.reason).toMatch(/stopped before its commit point/);
    expect(report.results[1]!.reason).toBe('not started: the run was stopped');
    expect(batchExitCode(report)).toBe(1);
    expect(journals(dir)).toEqual([]);
    // The first image is its original self: same format, same guest, clean.
    const first = join(dir, fixtures[0]!.name);
    expect(sha256(first)).toBe(sha256(`${first}.orig`));
    expect(qemuImgStatus(['check', '-f', 'qcow2', first]).status).toBe(0);
    const states = latestStates(parseManifest(readFileSync(manifest, 'utf8')).records);
    expect([...states.values()].map((r) => r.state)).toEqual(['pending', 'pending', 'pending', 'pending']);

    const again = await convertMany([], { to: 'qed', drivers: allDrivers, manifest });
    expect(again.ok).toBe(true);
    expect(again.results.map((r) => r.outcome)).toEqual(['converted', 'converted', 'converted', 'converted']);
    for (const f of fixtures) judgeConverted(dir, f, 'qed');
  });
});

describe('convertMany without images', () => {
  it('no names and a manifest that records none: a usage error, and no manifest file left behind', async () => {
    const m = join(tmp.dir, 'typo.jsonl');
    await expect(convertMany([], { to: 'qed', drivers: allDrivers, manifest: m })).rejects.toThrow(/no images to convert: none named, and the manifest .*typo\.jsonl records none/);
    expect(existsSync(m)).toBe(false);
    await expect(convertMany([], { to: 'qed', drivers: allDrivers })).rejects.toThrow(/no images to convert/);
  });
});

describe.runIf(qemuAvailable())('the default scheduling rule', () => {
  it('one image at a time per filesystem, filesystems in parallel', async () => {
    const dir = join(tmp.dir, 'lanes');
    mkdirSync(dir);
    const fixtures = makeMixedImages(dir).filter((f) => f.expect === 'converted');
    // Two pretend filesystems: the images' device is the first letter's parity.
    const files: BatchFileSystem = {
      ...nodeBatchFileSystem,
      identify: async (p) => {
        const f = await nodeBatchFileSystem.identify(p);
        const lane = fixtures.findIndex((x) => join(dir, x.name) === f.realPath) % 2 === 0 ? 'even' : 'odd';
        return { ...f, device: lane };
      },
    };
    const running = new Map<string, number>();
    let maxPerLane = 0;
    let maxTotal = 0;
    const report = await convertMany(
      fixtures.map((f) => join(dir, f.name)),
      {
        to: 'qed',
        drivers: allDrivers,
        files,
        onEvent: (e) => {
          if (e.type === 'start') expect(e.filesystems).toBe(2);
          if (e.type === 'image-start') running.set(e.image.device, (running.get(e.image.device) ?? 0) + 1);
          if (e.type === 'image-end' && running.has(e.image.device)) running.set(e.image.device, running.get(e.image.device)! - 1);
          maxPerLane = Math.max(maxPerLane, ...running.values());
          maxTotal = Math.max(maxTotal, [...running.values()].reduce((a, b) => a + b, 0));
        },
      },
    );
    expect(report.ok).toBe(true);
    expect(maxPerLane).toBe(1);
    expect(maxTotal).toBe(2);
    expect(existsSync(join(dir, 'disk.raw'))).toBe(true);
  });
});
