/**
 * A VMDK grain table entry is a 32-bit sector number. Relocation (identity targets, moves to VHD
 * dynamic) writes the new place through the unit's pointer.encode and then punches the old place: an
 * offset at or past 2 TiB must be refused, not wrapped to another sector (DataView.setUint32 wraps).
 */
import { writeFileSync } from 'node:fs';
import { afterAll, describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { openImage } from '../../src/image.js';
import { qemuAvailable, qemuImg, withTmpDir } from '../support/qemu.js';

describe.skipIf(!qemuAvailable())('VMDK sparse grain pointers', () => {
  const tmp = withTmpDir('imgconv-vmdk-reloc-');
  afterAll(() => tmp.cleanup());

  test('encode reaches the last 32-bit sector and refuses 2 TiB', async () => {
    const raw = tmp.path('a.raw');
    writeFileSync(raw, Buffer.alloc(1 << 20, 0x5a));
    const img = tmp.path('a.vmdk');
    qemuImg(['convert', '-f', 'raw', '-O', 'vmdk', raw, img]);
    const chain = await openImage(img, { drivers: allDrivers, backing: false });
    try {
      const units = await chain.layers[0]!.relocatable!(0, 0);
      expect(units.length).toBeGreaterThan(0);
      const p = units[0]!.pointer;
      const last = p.encode(2 ** 41 - 512);
      expect(Buffer.from(last).readUInt32LE(0)).toBe(0xffffffff);
      expect(() => p.encode(2 ** 41)).toThrow(/2 TiB/);
    } finally {
      await chain.close();
    }
  });
});
