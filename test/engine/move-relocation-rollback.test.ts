/**
 * A relocating conversion (QED → VHD dynamic, moves relocated inside the QED in rounds of the
 * relocation window) cancelled after its relocation, at its first metadata write: the rollback must
 * leave a valid QED with the same guest content and say 'rolled-back'. Disk space is sampled after every
 * write, truncate and punch (PeakStorage): until the cancel it stays within the plan's peak (one round),
 * and so does the rollback. Its reclaim compacts the QED, whose relocated data now lies past its old end,
 * back into the holes the rounds punched; compaction copies in batches of the conversion's relocation
 * window and punches each batch's old places before the next (64 MiB random, 8 MiB window: 8.0 MiB with
 * the rollback; 34.0 MiB when round B copied everything before freeing anything, which on a disk with
 * the planned room ended a late Ctrl-C/EIO/ENOSPC in ENOSPC during the clean-up).
 */
import { describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { PeakStorage, randomRawSuite } from '../support/peak-storage.js';
import { ConversionFailedError, convertInPlace, planConversion } from '../../src/engine/convert.js';
import { qemuAvailable, qemuImg, qemuImgStatus } from '../support/qemu.js';

const MiB = 1 << 20;
const SIZE = 64 * MiB;
const WINDOW = 8 * MiB;

describe.skipIf(!qemuAvailable())('relocating moves cancelled after the relocation', () => {
  const { tmp, raw } = randomRawSuite('imgconv-moverel-rb-', SIZE);

  const run = async (name: string) => {
    const img = tmp.path(name);
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, img]);
    const opts = { to: 'vhd', drivers: allDrivers, relocationWindow: WINDOW };
    const plan = await planConversion(img, opts);
    expect(plan.steps).toBeUndefined();
    expect(plan.relocation?.rounds).toBeGreaterThan(2);
    const storage = new PeakStorage();
    await storage.start([img]);
    const ac = new AbortController();
    let err: unknown;
    let peakAtAbort = -1;
    try {
      await convertInPlace(img, {
        ...opts,
        storage,
        signal: ac.signal,
        onProgress: (e) => {
          if (e.phase === 'write' && !ac.signal.aborted) {
            peakAtAbort = storage.peakAlloc;
            ac.abort();
          }
        },
      });
    } catch (e) {
      err = e;
    }
    console.log(`${name}: planned peak ${plan.peakExtraBytes / MiB} MiB, moved ${plan.dataMoveBytes / MiB} MiB; measured peak until the cancel ${peakAtAbort / MiB} MiB, with the rollback ${storage.peakAlloc / MiB} MiB`);
    return { img, plan, err, peakAtAbort, peak: storage.peakAlloc };
  };

  test('qed → vhd: the rollback leaves a valid QED with the same guest content', async () => {
    const { img, plan, err, peakAtAbort } = await run('a.qed');
    expect(err).toBeInstanceOf(ConversionFailedError);
    expect((err as ConversionFailedError).imageState).toBe('rolled-back');
    const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'qed', raw, img]);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
    const chk = qemuImgStatus(['check', '-f', 'qed', img]);
    expect(chk.status, chk.stdout + chk.stderr).toBe(0);
    expect(peakAtAbort).toBeGreaterThan(0);
    expect(peakAtAbort).toBeLessThanOrEqual(plan.peakExtraBytes + 2 * MiB);
  }, 300_000);

  test('the rollback takes no more disk space than the plan says', async () => {
    const { plan, peak } = await run('b.qed');
    expect(peak).toBeLessThanOrEqual(plan.peakExtraBytes + 2 * MiB);
  }, 300_000);
});
