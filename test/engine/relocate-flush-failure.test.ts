/**
 * A failed fsync of the image during a relocating conversion (data moved inside the source, its pointers
 * rewritten round by round). The usual rollback of such a conversion reclaims — reads the source's
 * pointers and punches what they no longer reference — but after a failed fsync the page cache may hold
 * pointer writes the disk never got, and a punch could free the only durable copy. So the conversion
 * stops changing the image at once, says needs-recover, and keeps the journal; recover (which reads the
 * disk) then gives back the source with the same guest content.
 */
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { ConversionFailedError, convertInPlace } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { FaultyStorage, memoryStorageOf } from '../support/recording.js';
import { qemuAvailable } from '../support/qemu.js';
import { checkState, originalOf } from '../crash/harness.js';
import { buildFixtures } from '../crash/fixtures.js';

describe.runIf(qemuAvailable())('an image flush that fails during relocation', () => {
  for (const [name, to] of [
    ['qed-c64k', 'raw'],
    ['qed-c4k', 'vhd'],
  ] as const) {
    it(`${name} → ${to}: no punch or write after the failed flush; needs-recover; recover gives the source back`, async () => {
      const fx = buildFixtures('qed', 'base').find((f) => f.name === name)!;
      const orig = await originalOf(fx);
      const counting = new FaultyStorage(memoryStorageOf(fx.files), 'EIO', -1, false);
      counting.log = [];
      await convertInPlace(fx.image, { to, format: 'qed', drivers: allDrivers, storage: counting });
      // The image's flushes between the PREPARE (the journal's first flush) and the COMMIT record: the
      // relocation rounds' (and the moves') flushes. Fault the last of them, after pointers were rewritten.
      const log = counting.log;
      const firstJournalFlush = log.findIndex((op) => /^flush .*imgconv-journal/.test(op));
      const imageFlushes = log.flatMap((op, i) => (i > firstJournalFlush && op === `flush ${fx.image}@0` ? [i] : []));
      const commitFlush = log.findIndex((op, i) => i > firstJournalFlush && /^flush .*imgconv-journal/.test(op));
      const during = imageFlushes.filter((i) => i < commitFlush);
      expect(during.length).toBeGreaterThanOrEqual(2);
      const at = during[during.length - 1]!;

      const disk = memoryStorageOf(fx.files);
      const faulty = new FaultyStorage(disk, 'EIO', at, false);
      faulty.log = [];
      const err = await convertInPlace(fx.image, { to, format: 'qed', drivers: allDrivers, storage: faulty }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ConversionFailedError);
      expect((err as ConversionFailedError).imageState).toBe('needs-recover');
      expect((err as Error).message).toMatch(/flush of the image failed.*imgconv recover/);
      expect(faulty.hit).toMatch(/^flush /);
      const after = faulty.log.slice(at + 1).filter((op) => /^(write|punch|truncate) /.test(op) && op.includes(fx.image) && !op.includes('journal'));
      expect(after).toEqual([]);
      expect(await disk.exists(journalPath(fx.image))).toBe(true);
      expect(await checkState(disk, fx, to, orig, false)).toEqual({ ok: true, format: expect.any(String) });
    });
  }
});
