/**
 * The relocation window reaches identity targets (raw, VHD fixed, VMDK monolithicFlat): a smaller
 * ConvertOptions.relocationWindow plans more, smaller rounds and a smaller peak, and the conversion
 * takes what the plan says (measured with PeakStorage, as in peak-extra.test.ts). Before the window was
 * passed to planIdentity, every identity target planned with the 64 MiB default whatever was asked.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { PeakStorage, randomRaw } from '../support/peak-storage.js';
import { convertInPlace, planConversion } from '../../src/engine/convert.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const WINDOW = 512 << 10;

describe.skipIf(!qemuAvailable())('relocation window for identity targets', () => {
  const tmp = withTmpDir('imgconv-idwin-');
  let raw = '';
  let qed = '';
  beforeAll(() => {
    raw = tmp.path('src.raw');
    randomRaw(raw, SIZE);
    qed = tmp.path('src.qed');
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, qed]);
  });
  afterAll(() => tmp.cleanup());

  test('QED → raw with a 512 KiB window: more rounds, a smaller peak, measured as planned, qemu-img compare identical', async () => {
    const img = tmp.path('work.qed');
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, img]);
    const wide = await planConversion(img, { to: 'raw', drivers: allDrivers });
    const opts = { to: 'raw', drivers: allDrivers, relocationWindow: WINDOW };
    const narrow = await planConversion(img, opts);
    const storage = new PeakStorage();
    await storage.start([img]);
    const report = await convertInPlace(img, { ...opts, storage });
    const summary = {
      wide: { rounds: wide.relocation?.rounds, peakMiB: wide.peakExtraBytes / MiB },
      narrow: { rounds: narrow.relocation?.rounds, peakMiB: narrow.peakExtraBytes / MiB },
      measuredAllocMiB: storage.peakAlloc / MiB,
      commitBytes: narrow.relocation?.commitBytes,
    };
    console.log(`QED → raw, ${SIZE / MiB} MiB of random data:`, JSON.stringify(summary));
    expect(narrow.relocation!.rounds, JSON.stringify(summary)).toBeGreaterThan(4 * wide.relocation!.rounds);
    // The 64 MiB default takes the whole disk in one window's rounds: its peak is about the disk.
    expect(wide.peakExtraBytes).toBeGreaterThan(SIZE / 2);
    // A round's copies (or the scratch) plus the commit record's bytes: a few windows at most.
    expect(narrow.peakExtraBytes, JSON.stringify(summary)).toBeLessThan(4 * WINDOW);
    // With rounds this small the commit decides the peak: identityPeakExtra counts the COMMIT record
    // (new and old bytes of the pinned ranges) plus their redo writes filling holes — an allowance of
    // commitBytes that QEMU's fully written QED tables do not take. So the plan is the measured peak
    // within one cluster, or above it by at most that allowance; never below.
    const commitBytes = narrow.relocation!.commitBytes;
    expect(storage.peakAlloc, JSON.stringify(summary)).toBeLessThanOrEqual(narrow.peakExtraBytes + (64 << 10));
    expect(narrow.peakExtraBytes - storage.peakAlloc, JSON.stringify(summary)).toBeLessThanOrEqual(commitBytes + (64 << 10));
    // Far below what the default window takes.
    expect(storage.peakAlloc).toBeLessThan(wide.peakExtraBytes / 8);
    expect(report.written.dataBytes).toBe(narrow.dataMoveBytes);
    expect(qemuImgStatus(['compare', '-f', 'raw', '-F', 'raw', raw, img]).status).toBe(0);
  }, 300_000);

  // The other identity targets plan through the same planIdentity call.
  for (const c of [
    { to: 'vhd', options: { subformat: 'fixed' } },
    { to: 'vmdk', options: { subformat: 'monolithicFlat' } },
  ]) {
    test(`QED → ${c.to} ${c.options.subformat}: the plan's rounds and peak follow the window`, async () => {
      const wide = await planConversion(qed, { to: c.to, options: c.options, drivers: allDrivers });
      const narrow = await planConversion(qed, { to: c.to, options: c.options, drivers: allDrivers, relocationWindow: WINDOW });
      expect(narrow.relocation!.rounds).toBeGreaterThan(4 * wide.relocation!.rounds);
      expect(narrow.peakExtraBytes).toBeLessThan(4 * WINDOW);
      expect(wide.peakExtraBytes).toBeGreaterThan(SIZE / 2);
    });
  }
});
