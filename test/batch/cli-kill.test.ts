/**
 * The real CLI on a directory of mixed images with --jobs 3 and a manifest: killed with SIGKILL
 * once the manifest records the first image done while others are mid-conversion, then run again
 * with the same manifest. Every image must end converted (qemu-img compare against its pristine
 * copy, qemu-img check clean) or be listed with its reason and byte-identical; nothing is converted
 * twice. Also Ctrl-C (SIGINT) during a batch, and the plain and JSON outputs tagged by image.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseManifest, latestStates, type ManifestRecord } from '../../src/batch/manifest.js';
import { qemuAvailable, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { judgeConverted, keepOriginals, link, makeMixedImages, sha256, type Fixture } from './fixtures.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-batch-cli-');
afterAll(() => tmp.cleanup());

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'batch', 'run.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (!existsSync(join(root, 'dist', 'src', 'batch', 'run.js'))) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

function env(): NodeJS.ProcessEnv {
  const e = { ...process.env };
  delete e.CI;
  return e;
}

function records(path: string): ManifestRecord[] {
  if (!existsSync(path)) return [];
  // The writer may be mid-append: parseManifest ignores a torn last line.
  return parseManifest(readFileSync(path, 'utf8')).records;
}

function journals(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.endsWith('.imgconv-journal'));
}

/** Starts the CLI and kills it (signal) as soon as `when` holds, polled every few milliseconds. */
function runUntil(args: string[], when: () => boolean, signal: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null; fired: boolean; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: env() });
    let stderr = '';
    let fired = false;
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setInterval(() => {
      if (!fired && when()) {
        fired = true;
        p.kill(signal);
      }
    }, 5);
    p.on('exit', (code, sig) => {
      clearInterval(t);
      resolve({ code, signal: sig, fired, stderr });
    });
  });
}

describe.runIf(qemuAvailable())('imgconv inplace with many images (real CLI)', () => {
  it('SIGKILL midway, then the same command again: every image converted or listed with its reason; none converted twice', async () => {
    const dir = join(tmp.dir, 'kill');
    mkdirSync(dir);
    const fixtures: Fixture[] = makeMixedImages(dir, { slow: [4, 16, 24] });
    const sums = keepOriginals(dir, fixtures);
    link(dir, 'slow0.qcow2', 'alias.qcow2');
    const manifest = join(dir, 'batch.jsonl');
    const args = ['inplace', '--to', 'qed', '--jobs', '3', '--manifest', manifest, ...fixtures.map((f) => join(dir, f.name)), join(dir, 'alias.qcow2')];

    const t0 = Date.now();
    const first = await runUntil(args.concat(['--progress', 'json']), () => records(manifest).some((r) => r.state === 'done') && journals(dir).length > 0, 'SIGKILL');
    const killedAfter = Date.now() - t0;
    expect(first.fired, `the run ended (code ${first.code}) before an image was done while another was mid-conversion:\n${first.stderr}`).toBe(true);
    expect(first.signal).toBe('SIGKILL');
    const atKill = records(manifest);
    const stateAtKill = latestStates(atKill);
    const doneAtKill = [...stateAtKill.values()].filter((r) => r.state === 'done').map((r) => r.image);
    const midway = journals(dir).map((j) => join(dir, j.replace(/\.imgconv-journal$/, '')));
    expect(doneAtKill.length).toBeGreaterThan(0);
    expect(midway.length, 'an image was mid-conversion when killed').toBeGreaterThan(0);
    expect(doneAtKill.length).toBeLessThan(fixtures.length);

    const t1 = Date.now();
    const again = spawnSync(process.execPath, [bin, ...args, '--progress', 'plain'], { encoding: 'utf8', env: env() });
    const resumeMs = Date.now() - t1;
    // Two images cannot be converted, so the batch says so with a non-zero status.
    expect(again.status, again.stderr).toBe(1);
    expect(journals(dir)).toEqual([]);

    // Judged by qemu-img, each image against its pristine copy.
    for (const f of fixtures) {
      if (f.expect === 'converted') judgeConverted(dir, f, 'qed');
      else expect(sha256(join(dir, f.name)), `${f.name} untouched`).toBe(sums.get(f.name));
    }
    const all = records(manifest);
    const latest = latestStates(all);
    for (const f of fixtures) {
      const r = latest.get(join(dir, f.name))!;
      expect(r.state, f.name).toBe(f.expect === 'refused' ? 'refused' : 'done');
    }
    expect(latest.get(join(dir, 'snapshot.qcow2'))!.reason).toMatch(/internal snapshot/);
    expect(latest.get(join(dir, 'corrupt.qcow2'))!.reason).toMatch(/cluster_bits = 99/);
    // Nothing converted twice: images done before the kill got no new record at all; those
    // caught mid-conversion were recovered first.
    const resumed = all.slice(atKill.length);
    for (const image of doneAtKill) expect(resumed.filter((r) => r.image === image), image).toEqual([]);
    for (const image of midway) expect(resumed.some((r) => r.image === image && r.state === 'recovering'), `${image} recovered first`).toBe(true);
    // Each converted image completed exactly one conversion over both runs: a done record with the
    // conversion's counts, or one saying recovery (or the killed run) finished it.
    const completes = (r: ManifestRecord) => r.state === 'done' && (r.metadataBytes !== undefined || /finished by recovery|converted by the interrupted run/.test(r.note ?? ''));
    for (const f of fixtures) {
      const n = all.filter((r) => r.image === join(dir, f.name) && completes(r)).length;
      expect(n, `${f.name} conversions completed`).toBe(f.expect === 'converted' ? 1 : 0);
    }
    // The final table on stdout names every image with its result; the refusals say why.
    for (const f of fixtures) expect(again.stdout).toContain(f.name);
    expect(again.stdout).toMatch(/slow0\.qcow2 \(= .*alias\.qcow2\)/);
    expect(again.stdout).toMatch(/needs action:\n(.*\n)*.*snapshot\.qcow2: refused: .*internal snapshot/);
    expect(again.stdout).toMatch(/corrupt\.qcow2: refused: .*cluster_bits = 99/);
    // Plain progress: no escape bytes; every line is the batch's or tagged with an image.
    expect(again.stderr).not.toMatch(/\x1b/);
    const names = [...fixtures.map((f) => join(dir, f.name))];
    for (const line of again.stderr.trimEnd().split('\n')) {
      expect(line.startsWith('imgconv: '), line).toBe(true);
      const tagged = names.some((n) => line.includes(`${n}:`) || line.includes(`${n} (= `));
      const batchLine = /^imgconv: \d+ images → qed/.test(line);
      expect(tagged || batchLine, line).toBe(true);
    }
    const base = (p: string) => p.slice(dir.length + 1);
    console.log(`batch of ${fixtures.length} images: killed after ${killedAfter} ms with ${doneAtKill.length} done (${doneAtKill.map(base).join(', ')}) and ${midway.length} mid-conversion (${midway.map(base).join(', ')}); the resumed run took ${resumeMs} ms`);
  }, 120_000);

  it('Ctrl-C (SIGINT): the image under way stops safely, the rest stay pending in the manifest, exit non-zero; JSON events tagged by image', async () => {
    const dir = join(tmp.dir, 'sigint');
    mkdirSync(dir);
    const fixtures = makeMixedImages(dir, { slow: [24, 8] }).filter((f) => f.expect === 'converted');
    keepOriginals(dir, fixtures);
    const manifest = join(dir, 'm.jsonl');
    let stderrSoFar = '';
    const args = ['inplace', '--to', 'qed', '--jobs', '1', '--manifest', manifest, '--progress', 'json', ...fixtures.map((f) => join(dir, f.name))];
    const r = await new Promise<{ code: number | null; stderr: string; stdout: string }>((resolve) => {
      const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: env() });
      let stdout = '';
      let sent = false;
      p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      p.stderr.on('data', (d: Buffer) => {
        stderrSoFar += d.toString();
        // The first image is moving data: before its commit point.
        if (!sent && /"event":"(phase|progress)","phase":"move","bytesDone":[1-9]/.test(stderrSoFar)) {
          sent = true;
          p.kill('SIGINT');
        }
      });
      p.on('exit', (code) => resolve({ code, stderr: stderrSoFar, stdout }));
    });
    expect(r.code).toBe(1);
    const events = r.stderr.trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    for (const e of events) for (const k of ['event', 'phase', 'bytesDone', 'bytesTotal', 'rate', 'etaSeconds', 'elapsedMs', 'image']) expect(e, JSON.stringify(e)).toHaveProperty(k);
    expect(events[0]!.event).toBe('batch-start');
    expect(events.some((e) => e.event === 'stopping' && e.image === null)).toBe(true);
    const end = events[events.length - 1]!;
    expect(end).toMatchObject({ event: 'batch-end', interrupted: true, ok: false });
    // One final event (done or error) per image, tagged with it.
    for (const f of fixtures) {
      const finals = events.filter((e) => e.image === join(dir, f.name) && (e.event === 'done' || e.event === 'error'));
      expect(finals, f.name).toHaveLength(1);
      expect(finals[0]).toMatchObject({ event: 'error', outcome: 'pending' });
    }
    const latest = latestStates(records(manifest));
    expect([...latest.values()].map((x) => x.state)).toEqual(fixtures.map(() => 'pending'));
    expect(journals(dir)).toEqual([]);
    const firstImg = join(dir, fixtures[0]!.name);
    expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qcow2', `${firstImg}.orig`, firstImg]).status).toBe(0);
    expect(qemuImgStatus(['check', '-f', 'qcow2', firstImg]).status).toBe(0);
    expect(r.stdout).toMatch(/needs action:/);
    expect(r.stdout).toMatch(/pending \(stopped before its commit point/);
  }, 120_000);
});
