/**
 * Regression (engine fix "an I/O error before the first write is a ConversionFailedError"): EIO while
 * opening or analysing the image used to escape convertInPlace as a bare IoError, so a caller could not
 * tell in which state the image was. It is now ConversionFailedError('untouched'), and the file is
 * byte-identical; refusals and a missing file keep their own errors.
 */
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace, ConversionFailedError } from '../../src/engine/convert.js';
import { IoError, UsageError } from '../../src/errors.js';
import { FaultyStorage, memoryStorageOf } from '../support/recording.js';

const PATH = '/mem/disk.raw';
const raw = new Uint8Array(256 << 10).fill(0x5a, 0, 8192);
const QED = '/mem/disk.qed';

/** A QED image (converted from `raw` without faults): its analysis reads the header and tables. */
async function qedImage(): Promise<Uint8Array> {
  const s = memoryStorageOf(new Map([[QED, raw]]));
  await convertInPlace(QED, { to: 'qed', format: 'raw', drivers: allDrivers, storage: s });
  return s.files.get(QED)!.snapshot();
}

describe('I/O errors before the first write', () => {
  for (const at of [0, 1, 2, 3]) {
    it(`EIO at operation ${at} (the open or a read while analysing): ConversionFailedError untouched, file unchanged`, async () => {
      const qed = await qedImage();
      const disk = memoryStorageOf(new Map([[QED, qed]]));
      const faulty = new FaultyStorage(disk, 'EIO', at, false);
      const err = await convertInPlace(QED, { to: 'qcow2', format: 'qed', drivers: allDrivers, storage: faulty }).catch((e: unknown) => e);
      expect(faulty.hit).toMatch(at === 0 ? /^open / : /^read /);
      expect(err).toBeInstanceOf(ConversionFailedError);
      expect((err as ConversionFailedError).imageState).toBe('untouched');
      expect((err as ConversionFailedError).causeError).toBeInstanceOf(IoError);
      expect((err as Error).message).toMatch(/input\/output error/);
      expect(Buffer.from(disk.files.get(QED)!.snapshot()).equals(Buffer.from(qed))).toBe(true);
      expect(await disk.exists(`${QED}.imgconv-journal`)).toBe(false);
    });
  }

  it('a missing file and a refusal keep their own errors', async () => {
    const disk = memoryStorageOf(new Map([[PATH, raw]]));
    await expect(convertInPlace('/mem/nope.raw', { to: 'qed', format: 'raw', drivers: allDrivers, storage: disk })).rejects.toBeInstanceOf(IoError);
    await expect(convertInPlace(PATH, { to: 'raw', format: 'raw', drivers: allDrivers, storage: disk })).rejects.toBeInstanceOf(UsageError);
  });
});
