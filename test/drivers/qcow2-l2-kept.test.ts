/**
 * A qcow2 with small clusters has one small L2 table next to each stretch of data it maps, so every
 * scan of the tables is one read per table. Opening the image (cluster kinds), mapping() and
 * hostSpace() scan them in turn: the tables are read once and kept for the three, then let go — a
 * scan after hostSpace() reads the file again.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { openImage } from '../../src/image.js';
import { randomRaw } from '../support/peak-storage.js';
import { qemuAvailable, qemuImg, withTmpDir } from '../support/qemu.js';

describe.skipIf(!qemuAvailable())('qcow2 L2 tables kept across one analysis', () => {
  it('open, mapping() and hostSpace() read each table once; later scans read the file', async () => {
    const tmp = withTmpDir('imgconv-l2-kept-');
    try {
      const raw = tmp.path('src.raw');
      randomRaw(raw, 4 << 20);
      const img = tmp.path('src.qcow2');
      qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, img]);
      const dev = new MemoryBlockDevice();
      await dev.write(new Uint8Array(readFileSync(img)), 0);
      // 512-byte reads at the tables' offsets (the L1 table says where they are).
      const reads: number[] = [];
      const read = dev.read.bind(dev);
      dev.read = async (buf: Uint8Array, offset: number) => {
        if (buf.length === 512) reads.push(offset);
        return read(buf, offset);
      };
      const chain = await openImage(img, { drivers: allDrivers, topDevice: dev, backing: false });
      try {
        const image = chain.layers[0]!;
        const map = await image.mapping();
        const hs = await image.hostSpace();
        const tables = hs.ranges().filter((r) => r.what === 'L2 table');
        const tableCount = tables.reduce((n, r) => n + r.length / 512, 0);
        // 4 MiB of 512-byte clusters: 8,192 entries, 128 tables, none side by side.
        expect(tableCount).toBe(128);
        expect(tables.length).toBe(128);
        const tableReads = reads.filter((o) => tables.some((t) => o >= t.start && o < t.start + t.length));
        // Three scans read them three times before.
        expect(tableReads.length).toBe(128);
        expect(new Set(tableReads).size).toBe(128);
        expect(map.virtualSize).toBe(4 << 20);
        // The same mapping as an image whose mapping() scans the file itself (no open scan kept).
        const again = await openImage(img, { drivers: allDrivers, topDevice: dev, backing: false });
        try {
          const fresh = again.layers[0]!;
          await fresh.hostSpace(); // lets the kept tables go
          expect([...(await fresh.mapping())]).toEqual([...map]);
        } finally {
          await again.close();
        }
        // After hostSpace() the tables are read from the file again (check() scans them).
        reads.length = 0;
        await image.check();
        expect(reads.filter((o) => tables.some((t) => o >= t.start && o < t.start + t.length)).length).toBe(128);
      } finally {
        await chain.close();
      }
    } finally {
      tmp.cleanup();
    }
  });
});
