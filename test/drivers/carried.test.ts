/**
 * The disk's identity (UUID, adapter type, geometry, creator) carried across conversions where the
 * target has a place for it, and listed as dropped where it has none.
 */
import { copyFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { canonicalToVmdkUuid, vmdkUuidToCanonical } from '../../drivers/vmdk/descriptor.js';
import { convertInPlace } from '../../src/engine/convert.js';
import { openImage } from '../../src/image.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

describe('VMDK UUID text', () => {
  propTest.prop([fc.uuid()])('canonical → VMware bytes → canonical', (u) => {
    fc.pre(!/^[0-]+$/.test(u));
    const text = canonicalToVmdkUuid(u);
    expect(text).toMatch(/^([0-9a-f]{2} ){7}[0-9a-f]{2}-([0-9a-f]{2} ){7}[0-9a-f]{2}$/);
    expect(vmdkUuidToCanonical(text)).toBe(u.toLowerCase());
  });
  it('refuses what is not 16 bytes, and the all-zero UUID', () => {
    expect(vmdkUuidToCanonical('60 00 C2 9b')).toBeUndefined();
    expect(vmdkUuidToCanonical('00 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00')).toBeUndefined();
    expect(vmdkUuidToCanonical('60 00 C2 9b 3c 1b 27 5e-a3 52 4e 9f 40 2f 3a c5')).toBe('6000c29b-3c1b-275e-a352-4e9f402f3ac5');
  });
});

const carriedOf = async (file: string) => {
  const chain = await openImage(file, { drivers: allDrivers, backing: false });
  try {
    return chain.layers[0]!.info.carried ?? {};
  } finally {
    await chain.close();
  }
};

describe.runIf(qemuAvailable())('identity across conversions', () => {
  it('VHD → VMDK → VHD keeps the UUID; the VMDK keeps geometry too; qcow2 lists all as dropped', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('d.vhd');
      qemuImg(['create', '-q', '-f', 'vpc', f, '64M']);
      qemuIo(f, 'vpc', ['write -P 0x31 0 1M', 'write -P 0x32 40M 64k']);
      copyFileSync(f, `${f}.orig`);
      const first = await carriedOf(f);
      expect(first.uuid).toMatch(/^[0-9a-f-]{36}$/);
      const toVmdk = await convertInPlace(f, { to: 'vmdk', drivers: allDrivers });
      expect(toVmdk.dropped.join('; ')).toContain('creator application');
      expect(toVmdk.dropped.join('; ')).not.toContain('disk UUID');
      expect(await carriedOf(f)).toMatchObject({ uuid: first.uuid, geometry: first.geometry, adapterType: 'ide' });
      expect(qemuImgStatus(['check', '-f', 'vmdk', f]).status).toBe(0);
      const back = await convertInPlace(f, { to: 'vhd', drivers: allDrivers });
      expect(back.dropped.join('; ')).not.toContain('disk UUID');
      expect((await carriedOf(f)).uuid).toBe(first.uuid);
      const toQcow2 = await convertInPlace(f, { to: 'qcow2', drivers: allDrivers });
      expect(toQcow2.dropped.join('; ')).toContain(`disk UUID (${first.uuid})`);
      expect(qemuImgStatus(['compare', '-f', 'vpc', '-F', 'qcow2', `${f}.orig`, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  }, 60_000);
});
