/**
 * A data-file source (qcow2 with `data_file_raw=on`, made and filled by QEMU) → VHD dynamic with a small
 * relocation window: after the adoption the raw disk goes the way the route chooser sends a raw source —
 * through VMDK sparse, whose relocation bounds the moved blocks' second copies to a round — in the plan and
 * in the conversion (src/engine/adopt.ts → continueStages, convert.ts chooseRoute). The measured peak
 * (PeakStorage: allocated bytes of every file written, sampled after each mutation) is the plan's and about
 * the same disk's as a raw source; qemu-img compare judges the result. And between the rename (the
 * adoption's commit point) and the step after it the image is never opened again: the data file's device,
 * locked before the rename, carries on under the image's name (an open of the path would be a moment
 * without the lock, or a second OFD lock conflicting with the first).
 */
import { copyFileSync, existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { fileStorage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';
import { convertInPlace, planConversion } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { PassThroughStorage } from '../support/pass-through.js';
import { PeakStorage, randomRaw } from '../support/peak-storage.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const WINDOW = 2 * MiB;

/** The formats each step converts to, nested steps (a route through an intermediate) inside their own list. */
type Route = (string | Route)[];
interface Stepped {
  target: { format: string };
  steps?: Stepped[];
}
const routeOf = (p: Stepped): Route => p.steps?.map((s) => (s.steps ? routeOf(s) : s.target.format)) ?? [p.target.format];

/** Counts opens of one path after the first rename (the adoption's commit point). */
class OpenCounter extends PassThroughStorage {
  renamed = false;
  opensAfterRename: string[] = [];
  constructor(private readonly watched: string) {
    super(fileStorage);
  }
  override async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    if (this.renamed && path === this.watched) this.opensAfterRename.push(`${path} ${JSON.stringify(opts)}`);
    return super.open(path, opts);
  }
  override async rename(from: string, to: string): Promise<void> {
    await super.rename(from, to);
    this.renamed = true;
  }
}

describe.skipIf(!qemuAvailable())('data-file source → VHD dynamic: the route chooser after the adoption', () => {
  const tmp = withTmpDir('imgconv-adoptroute-');
  let src = '';
  beforeAll(() => {
    src = tmp.path('src.raw');
    randomRaw(src, SIZE);
  });
  afterAll(() => tmp.cleanup());

  /** A qcow2 whose data lives in `<name>.data` (data_file_raw=on), filled from the random disk by qemu-img. */
  function dataFileImage(name: string): { image: string; data: string } {
    const image = tmp.path(`${name}.qcow2`);
    const data = tmp.path(`${name}.data`);
    const made = qemuImgStatus(['create', '-q', '-f', 'qcow2', '-o', `data_file=${name}.data,data_file_raw=on`, `${name}.qcow2`, String(SIZE)], tmp.dir);
    expect(made.status, made.stderr).toBe(0);
    const filled = qemuImgStatus(['convert', '-n', '-f', 'raw', '-O', 'qcow2', src, `${name}.qcow2`], tmp.dir);
    expect(filled.status, filled.stderr).toBe(0);
    expect(existsSync(data)).toBe(true);
    return { image, data };
  }

  test('plan and conversion go through VMDK; measured peak = plan ≈ the raw source\'s; qemu-img compare identical', async () => {
    const opts = { to: 'vhd', drivers: allDrivers, relocationWindow: WINDOW };
    // The same disk as a raw source: the route and the peak to match.
    const raw = tmp.path('same.raw');
    copyFileSync(src, raw);
    const rawPlan = await planConversion(raw, opts);
    const rawPeak = new PeakStorage();
    await rawPeak.start([raw]);
    await convertInPlace(raw, { ...opts, storage: rawPeak });
    expect(routeOf(rawPlan)).toEqual(['vmdk', 'vhd']);

    const { image, data } = dataFileImage('disk');
    const plan = await planConversion(image, opts);
    expect(plan.adoption?.dataFile).toBe(data);
    // The adoption, then raw → VHD dynamic through VMDK sparse (the route compared with the direct one).
    expect(routeOf(plan)).toEqual(['raw', ['vmdk', 'vhd']]);
    expect(plan.alternatives?.map((a) => a.via)).toContain('direct');
    const storage = new PeakStorage();
    await storage.start([image, data]);
    const report = await convertInPlace(image, { ...opts, storage });
    expect(routeOf(report)).toEqual(['raw', ['vmdk', 'vhd']]);
    expect(report.dataMoveBytes).toBe(plan.dataMoveBytes);
    expect(report.steps![1]!.steps![1]!.relocation?.rounds).toBe(plan.steps![1]!.steps![1]!.relocation?.rounds);
    const summary = {
      planPeakMiB: plan.peakExtraBytes / MiB,
      measuredPeakMiB: storage.peakAlloc / MiB,
      rawSourcePlanPeakMiB: rawPlan.peakExtraBytes / MiB,
      rawSourceMeasuredPeakMiB: rawPeak.peakAlloc / MiB,
      movedMiB: plan.dataMoveBytes / MiB,
      rounds: plan.steps![1]!.steps![1]!.relocation?.rounds,
      alternatives: plan.alternatives,
    };
    console.log(`qcow2 (data_file_raw=on) → vhd, ${SIZE / MiB} MiB random, window ${WINDOW / MiB} MiB:`, JSON.stringify(summary));
    expect(storage.samples).toBeGreaterThan(10);
    // Plan = measured, and the same as for the raw source (the adoption adds nothing at the peak).
    expect(Math.abs(plan.peakExtraBytes - storage.peakAlloc), JSON.stringify(summary)).toBeLessThanOrEqual(MiB);
    expect(Math.abs(storage.peakAlloc - rawPeak.peakAlloc), JSON.stringify(summary)).toBeLessThanOrEqual(MiB);
    // Bounded by a round, not the moved blocks (the direct route's copies: about half the disk).
    expect(storage.peakAlloc).toBeLessThan(4 * WINDOW);
    expect(existsSync(data)).toBe(false);
    expect(existsSync(journalPath(image))).toBe(false);
    const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'vpc', src, image]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.status).toBe(0);
    expect(JSON.parse(qemuImg(['info', '--output=json', '-f', 'vpc', image])).format).toBe('vpc');
  }, 120_000);

  test('between the rename and the next step the image is not opened again (the locked data file device carries on)', async () => {
    const { image, data } = dataFileImage('lock');
    const storage = new OpenCounter(image);
    const report = await convertInPlace(image, { to: 'vhd', drivers: allDrivers, relocationWindow: WINDOW, storage });
    expect(storage.renamed).toBe(true);
    expect(routeOf(report)).toEqual(['raw', ['vmdk', 'vhd']]);
    expect(storage.opensAfterRename).toEqual([]);
    expect(existsSync(data)).toBe(false);
    const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'vpc', src, image]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  }, 120_000);
});
