/**
 * Defects outside the engine that the crash harness's qemu-img confirmation ran into, kept as
 * regression tests once fixed.
 */
import { describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace } from '../../src/engine/convert.js';
import { filesOf, memoryStorageOf } from '../support/recording.js';
import { qemuAvailable, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { buildFixtures } from './fixtures.js';

describe.runIf(qemuAvailable())('known defects found by the crash harness', () => {
  // The qcow2 target wrote imgconv's name ("vhd") as the backing format; QEMU's name for VHD is "vpc",
  // so qemu-img could not open the converted image ("Unknown driver 'vhd'"). Targets now get QEMU's
  // name (FormatDriver.qemuName) from the engine.
  it('a differencing VHD converted to qcow2 opens in qemu-img (backing format written as QEMU\'s "vpc")', async () => {
    const fx = buildFixtures('vhd').find((f) => f.name === 'vhd-diff')!;
    const storage = memoryStorageOf(fx.files);
    await convertInPlace(fx.image, { to: 'qcow2', format: 'vhd', drivers: allDrivers, storage });
    const tmp = withTmpDir('imgconv-known-');
    try {
      for (const [p, b] of filesOf(storage)) writeFileSync(join(tmp.dir, p.split('/').pop()!), b);
      const r = qemuImgStatus(['check', join(tmp.dir, fx.image.split('/').pop()!)]);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
    } finally {
      tmp.cleanup();
    }
  });
});
