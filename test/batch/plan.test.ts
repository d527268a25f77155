/**
 * The dry run of a batch (planMany and `imgconv plan IMAGE...`): one row per image with what would
 * move and the peak extra space, refusals with reasons, totals that are the sums of the single
 * plans, the space check per filesystem — and nothing written anywhere.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { planMany } from '../../src/batch/plan.js';
import { nodeBatchFileSystem } from '../../src/batch/files.js';
import { planConversion } from '../../src/engine/convert.js';
import { formatBatchPlan } from '../../src/progress/batch-table.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';
import { interrupt, link, makeMixedImages, sha256 } from './fixtures.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-batch-plan-');
afterAll(() => tmp.cleanup());

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'batch', 'plan.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (!existsSync(join(root, 'dist', 'src', 'batch', 'plan.js'))) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

function hashes(dir: string): Map<string, string> {
  return new Map(readdirSync(dir).map((n) => [n, sha256(join(dir, n))]));
}

describe.runIf(qemuAvailable())('dry run over many images', () => {
  const dir = join(tmp.dir, 'plan');

  it('planMany: a row per image, refusals with reasons, totals = sums of the single plans; nothing written', async () => {
    mkdirSync(dir);
    const fixtures = makeMixedImages(dir, { slow: [2] });
    copyFileSync(join(dir, 'plain.qcow2'), join(dir, 'interrupted.qcow2'));
    await interrupt(join(dir, 'interrupted.qcow2'), 'qed', 'prepared');
    link(dir, 'disk.raw', 'raw-link.img');
    const names = [...fixtures.map((f) => join(dir, f.name)), join(dir, 'interrupted.qcow2'), join(dir, 'raw-link.img'), join(dir, 'missing.qcow2')];
    const before = hashes(dir);
    const plan = await planMany(names, { to: 'qed', drivers: allDrivers, manifest: join(dir, 'never-written.jsonl') });
    expect(hashes(dir)).toEqual(before);
    expect(existsSync(join(dir, 'never-written.jsonl'))).toBe(false);

    const rows = new Map(plan.rows.map((r) => [r.image, r]));
    expect(plan.rows).toHaveLength(fixtures.length + 2);
    for (const f of fixtures) {
      const r = rows.get(join(dir, f.name))!;
      expect(r.outcome, `${f.name}: ${r.reason ?? ''}`).toBe(f.expect === 'converted' ? 'convert' : f.expect === 'skipped' ? 'skip' : 'refused');
      if (r.outcome === 'convert') {
        // Exactly what `imgconv plan` says for the image alone.
        const single = await planConversion(r.path, { to: 'qed', drivers: allDrivers });
        expect(r.plan!.peakExtraBytes).toBe(single.peakExtraBytes);
        expect(r.plan!.dataMoveBytes).toBe(single.dataMoveBytes);
      }
    }
    expect(rows.get(join(dir, 'disk.raw'))!.aliases).toEqual([join(dir, 'raw-link.img')]);
    expect(rows.get(join(dir, 'snapshot.qcow2'))!.reason).toMatch(/internal snapshot/);
    expect(rows.get(join(dir, 'corrupt.qcow2'))!.reason).toMatch(/cluster_bits = 99/);
    expect(rows.get(join(dir, 'interrupted.qcow2'))!.outcome).toBe('needs-recover');
    expect(rows.get(join(dir, 'missing.qcow2'))!.reason).toMatch(/ENOENT/);
    const convertible = plan.rows.filter((r) => r.plan);
    expect(plan.totalPeakExtraBytes).toBe(convertible.reduce((s, r) => s + r.plan!.peakExtraBytes, 0));
    expect(plan.totalMoveBytes).toBe(convertible.reduce((s, r) => s + r.plan!.dataMoveBytes + r.plan!.compactionMoveBytes, 0));
    expect(plan.totalPeakExtraBytes).toBeGreaterThan(0);
    expect(plan.filesystems).toHaveLength(1);
    expect(plan.filesystems[0]!.peakExtraBytes).toBe(plan.totalPeakExtraBytes);
    expect(plan.filesystems[0]!.freeBytes).toBeGreaterThan(0);

    // A filesystem without the room says so.
    const tight = await planMany(names, { to: 'qed', drivers: allDrivers, files: { ...nodeBatchFileSystem, freeBytes: async () => 1000 } });
    const text = formatBatchPlan(tight);
    expect(text).toMatch(/filesystem of .*: 6 images need up to .* more \(\d+ bytes\); 1000 B free: NOT ENOUGH/);
    expect(text).toMatch(/will not convert:\n(.*\n)*  .*snapshot\.qcow2: refused: .*internal snapshot/);
    expect(text).toMatch(/interrupted\.qcow2: an interrupted conversion .* is recovered first/);
  });

  it('imgconv plan IMAGE... and inplace --dry-run: one table, exit 1 when an image would not convert; one image: as before', () => {
    const before = hashes(dir);
    const run = (...args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
    const ok = run('plan', '--to', 'qed', join(dir, 'plain.qcow2'), join(dir, 'disk.vmdk'), join(dir, 'already.qed'));
    expect(ok.status, ok.stderr).toBe(0);
    const lines = ok.stdout.split('\n');
    expect(lines[0]).toMatch(/^image\s+from → to\s+metadata to write\s+data to move\s+peak extra space\s+result$/);
    expect(ok.stdout).toMatch(/plain\.qcow2\s+qcow2 → qed\s+\S+ \S+\s+\S+ \S+\s+\S+ \S+\s+convert/);
    expect(ok.stdout).toMatch(/already\.qed\s+qed → qed\s+—\s+—\s+—\s+skip \(already qed\)/);
    expect(ok.stdout).toMatch(/^total\s/m);
    const refused = run('inplace', '--dry-run', '--to', 'qed', join(dir, 'plain.qcow2'), join(dir, 'snapshot.qcow2'));
    expect(refused.status).toBe(1);
    expect(refused.stdout).toMatch(/snapshot\.qcow2: refused: .*internal snapshot/);
    const json = run('plan', '--to', 'qed', '--output', 'json', join(dir, 'plain.qcow2'), join(dir, 'disk.raw'));
    const j = JSON.parse(json.stdout) as { rows: { outcome: string }[]; totalPeakExtraBytes: number };
    expect(j.rows.map((r) => r.outcome)).toEqual(['convert', 'convert']);
    // One image: the single plan, unchanged.
    const one = run('plan', '--to', 'qed', join(dir, 'plain.qcow2'));
    expect(one.status).toBe(0);
    expect(one.stdout).toMatch(/^image: .*plain\.qcow2\nconversion: qcow2 → qed \(/);
    expect(hashes(dir)).toEqual(before);
  });
});
