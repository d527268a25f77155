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
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { fileStorage, type MemoryStorage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';
import { convertInPlace, planConversion } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { recover } from '../../src/engine/recover.js';
import { GuestReader } from '../../src/guest.js';
import { openImage } from '../../src/image.js';
import { PassThroughStorage } from '../support/pass-through.js';
import { PeakStorage, randomRaw, randomRawSuite } from '../support/peak-storage.js';
import { powerLossChoices, powerLossCuts, powerLossState, prng, RecordingStorage, stateAfter, type Files } from '../support/recording.js';
import { qemuAvailable, qemuImg, qemuImgStatus } from '../support/qemu.js';

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
  const { tmp, raw: src } = randomRawSuite('imgconv-adoptroute-', SIZE);

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

  test('every kill and sampled power-loss state of the three steps (adoption, raw → VMDK, VMDK → VHD), then recover: the source or the VHD, same guest content', async () => {
    // A small disk for the harness: 4 MiB of random data, a 256 KiB window (the raw → VHD direct route
    // would copy a 2 MiB block before its commit), files in memory.
    const small = tmp.path('small.raw');
    randomRaw(small, 4 * MiB);
    qemuImgStatus(['create', '-q', '-f', 'qcow2', '-o', 'data_file=small.data,data_file_raw=on', 'small.qcow2', String(4 * MiB)], tmp.dir);
    expect(qemuImgStatus(['convert', '-n', '-f', 'raw', '-O', 'qcow2', small, 'small.qcow2'], tmp.dir).status).toBe(0);
    const image = '/m/small.qcow2';
    const data = '/m/small.data';
    const files: Files = new Map([
      [image, new Uint8Array(readFileSync(tmp.path('small.qcow2')))],
      [data, new Uint8Array(readFileSync(tmp.path('small.data')))],
    ]);
    const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
    const want = sha(readFileSync(small));
    const opts = { to: 'vhd', drivers: allDrivers, relocationWindow: 256 << 10 };
    const rec = new RecordingStorage(files);
    const report = await convertInPlace(image, { ...opts, storage: rec });
    expect(routeOf(report)).toEqual(['raw', ['vmdk', 'vhd']]);
    const renameAt = rec.log.findIndex((o) => o.kind === 'rename');
    // After the rename every operation on the disk names the image (the data file's device, renamed).
    expect(rec.log.slice(renameAt + 1).some((o) => o.kind === 'write' && o.path === image)).toBe(true);
    expect(rec.log.slice(renameAt + 1).every((o) => o.path !== data)).toBe(true);
    const guestOf = async (state: MemoryStorage): Promise<{ format: string; sha: string }> => {
      const chain = await openImage(image, { drivers: allDrivers, opener: (p, o) => state.open(p, o) });
      try {
        const r = await GuestReader.create(chain);
        return { format: chain.layers[0]!.format, sha: sha(await r.read(0, chain.layers[0]!.info.virtualSize)) };
      } finally {
        await chain.close();
      }
    };
    const seen: Record<string, number> = {};
    const judge = async (state: MemoryStorage, what: string) => {
      await recover(image, { drivers: allDrivers, storage: state });
      expect(await state.exists(journalPath(image)), `${what}: journal left`).toBe(false);
      expect((await recover(image, { drivers: allDrivers, storage: state })).action, `${what}: second recover`).toBe('none');
      const g = await guestOf(state);
      expect(g.sha, `${what}: guest content of ${g.format}`).toBe(want);
      const end = (await state.exists(data)) ? 'qcow2' : 'vhd';
      expect(g.format, what).toBe(end);
      seen[end] = (seen[end] ?? 0) + 1;
    };
    for (let n = 0; n <= rec.log.length; n++) await judge(stateAfter(rec.initial, rec.log, n), `kill after op ${n}`);
    const rnd = prng(20261204);
    for (const cut of powerLossCuts(rec.log)) {
      for (const ch of powerLossChoices(rec.log, cut, rnd, 6, 8)) await judge(powerLossState(rec.initial, rec.log, cut, ch.kept), `power loss at ${cut} keeping ${ch.kept.join(',')}`);
    }
    console.log(`qcow2 (data_file_raw=on) → vhd through vmdk: ${rec.log.length} operations; states recovered: ${JSON.stringify(seen)}`);
    expect(seen.qcow2).toBeGreaterThan(0);
    expect(seen.vhd).toBeGreaterThan(0);
  }, 600_000);
});
