/**
 * forEachL2: every qcow2 scan (mapping, host space, cluster kinds, check) visits L2 tables through it.
 * Tables side by side are read together and ahead of the visit; these tests pin that the visits, their
 * order, the bytes seen and the errors (an L1 entry that throws, a failing read) are exactly those of a
 * table-by-table loop.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { forEachL2 } from '../../drivers/qcow2/tables.js';
import type { Qcow2Layout } from '../../drivers/qcow2/open.js';

const cs = 4096;

/** A device whose cluster c holds the byte (c % 251) + 1 throughout, counting reads. */
async function device(clusters: number): Promise<{ dev: MemoryBlockDevice; reads: { offset: number; length: number }[] }> {
  const dev = new MemoryBlockDevice();
  for (let c = 0; c < clusters; c++) await dev.write(new Uint8Array(cs).fill((c % 251) + 1), c * cs);
  const reads: { offset: number; length: number }[] = [];
  const read = dev.read.bind(dev);
  dev.read = async (buf: Uint8Array, offset: number) => {
    reads.push({ offset, length: buf.length });
    return read(buf, offset);
  };
  return { dev, reads };
}

const layoutOf = (dev: MemoryBlockDevice) => ({ dev, clusterSize: cs }) as unknown as Qcow2Layout;

async function visits(layout: Qcow2Layout, offsets: number[], throwAt?: number): Promise<{ seen: [number, number, number | undefined][]; error?: unknown }> {
  const seen: [number, number, number | undefined][] = [];
  try {
    await forEachL2(
      layout,
      offsets.length,
      (i) => {
        if (i === throwAt) throw new Error(`entry ${i}`);
        return offsets[i]!;
      },
      async (i, off, t) => {
        if (t) {
          // The whole table is the cluster's byte.
          const b = new Uint8Array(t.buffer, t.byteOffset, t.byteLength);
          expect(b.length).toBe(cs);
          expect(b.every((x) => x === b[0])).toBe(true);
        }
        seen.push([i, off, t ? t.getUint8(0) : undefined]);
        await Promise.resolve();
      },
    );
    return { seen };
  } catch (error) {
    return { seen, error };
  }
}

describe('forEachL2', () => {
  it('visits every table in order with its own bytes, reading neighbours together', async () => {
    const { dev, reads } = await device(40);
    const offsets = [5, 6, 7, 0, 8, 20, 21, 3, 3, 0, 0, 30].map((c) => c * cs);
    const { seen, error } = await visits(layoutOf(dev), offsets);
    expect(error).toBeUndefined();
    expect(seen).toEqual(offsets.map((off, i) => [i, off, off === 0 ? undefined : ((off / cs) % 251) + 1]));
    // 5–7 one read, 8, 20–21, 3, 3 again, 30: six reads for nine tables, none for the zeros.
    expect(reads.map((r) => [r.offset / cs, r.length / cs])).toEqual([[5, 3], [8, 1], [20, 2], [3, 1], [3, 1], [30, 1]]);
  });

  it('an offset that throws is thrown in its turn, after the tables before it were visited', async () => {
    const { dev } = await device(20);
    const offsets = [1, 2, 3, 4, 5, 6].map((c) => c * cs);
    const { seen, error } = await visits(layoutOf(dev), offsets, 4);
    expect((error as Error).message).toBe('entry 4');
    expect(seen.map((v) => v[0])).toEqual([0, 1, 2, 3]);
  });

  it('a read that fails is thrown in its turn, after the tables before it were visited', async () => {
    const { dev } = await device(20);
    const read = dev.read.bind(dev);
    dev.read = async (buf: Uint8Array, offset: number) => {
      if (offset === 10 * cs) throw new Error('EIO');
      return read(buf, offset);
    };
    const { seen, error } = await visits(layoutOf(dev), [1, 2, 10, 11].map((c) => c * cs));
    expect((error as Error).message).toBe('EIO');
    expect(seen.map((v) => v[0])).toEqual([0, 1]);
  });

  it('past the end of the device a table reads as zeros', async () => {
    const { dev } = await device(4);
    const { seen } = await visits(layoutOf(dev), [3 * cs, 4 * cs, 5 * cs]);
    expect(seen).toEqual([[0, 3 * cs, 4], [1, 4 * cs, 0], [2, 5 * cs, 0]]);
  });

  test.prop([fc.array(fc.nat(40), { maxLength: 1200 }), fc.option(fc.nat(1200), { nil: undefined })], { numRuns: 60 })(
    'the same visits as a table-by-table loop, batches of at most 2 MiB',
    async (clusters, throwAt) => {
      const { dev, reads } = await device(41);
      const offsets = clusters.map((c) => c * cs);
      const { seen, error } = await visits(layoutOf(dev), offsets, throwAt);
      const upTo = throwAt !== undefined && throwAt < offsets.length ? throwAt : offsets.length;
      expect(seen).toEqual(offsets.slice(0, upTo).map((off, i) => [i, off, off === 0 ? undefined : ((off / cs) % 251) + 1]));
      expect(error !== undefined).toBe(upTo < offsets.length);
      for (const r of reads) expect(r.length).toBeLessThanOrEqual(2 << 20);
    },
  );
});
