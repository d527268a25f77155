/**
 * forEachL2 reads tables that do not lie side by side several at a time (qemu-img puts each L2 table
 * of a small-cluster image next to the data it maps), with at most 32 reads ahead of the table visited
 * and, for whole 2 MiB batches, one — so the visits stay those of a table-by-table loop (pinned in
 * qcow2-l2-batches.test.ts) and memory stays bounded.
 */
import { describe, expect, it } from 'vitest';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { forEachL2 } from '../../drivers/qcow2/tables.js';
import type { Qcow2Layout } from '../../drivers/qcow2/open.js';

/** A device of `clusters` clusters (cluster c filled with (c % 251) + 1) whose reads take a few ms, counting how many are in flight. */
async function slowDevice(cs: number, clusters: number): Promise<{ dev: MemoryBlockDevice; most: () => number; reads: () => number }> {
  const dev = new MemoryBlockDevice();
  for (let c = 0; c < clusters; c++) await dev.write(new Uint8Array(cs).fill((c % 251) + 1), c * cs);
  const read = dev.read.bind(dev);
  let inFlight = 0;
  let most = 0;
  let count = 0;
  dev.read = async (buf: Uint8Array, offset: number) => {
    inFlight++;
    count++;
    most = Math.max(most, inFlight);
    await new Promise((r) => setTimeout(r, 2));
    inFlight--;
    return read(buf, offset);
  };
  return { dev, most: () => most, reads: () => count };
}

async function scan(dev: MemoryBlockDevice, cs: number, offsets: number[]): Promise<number[]> {
  const seen: number[] = [];
  await forEachL2({ dev, clusterSize: cs } as unknown as Qcow2Layout, offsets.length, (i) => offsets[i]!, (_i, _off, t) => {
    seen.push(t ? t.getUint8(0) : 0);
  });
  return seen;
}

describe('forEachL2 read-ahead', () => {
  it('reads scattered small tables up to 32 at a time, each visited with its own bytes', async () => {
    const cs = 512;
    // Every other cluster: no two tables side by side, one read each.
    const offsets = Array.from({ length: 200 }, (_, i) => (2 * i + 1) * cs);
    const { dev, most, reads } = await slowDevice(cs, 402);
    const seen = await scan(dev, cs, offsets);
    expect(seen).toEqual(offsets.map((o) => ((o / cs) % 251) + 1));
    expect(reads()).toBe(200);
    // One ahead (two in flight) before; now up to 32 ahead of the one awaited.
    expect(most()).toBeGreaterThanOrEqual(16);
    expect(most()).toBeLessThanOrEqual(33);
  });

  it('reads whole 2 MiB batches one ahead, as before', async () => {
    const cs = 65536;
    // 128 tables side by side: four batches of 32 (2 MiB each).
    const offsets = Array.from({ length: 128 }, (_, i) => (i + 1) * cs);
    const { dev, most, reads } = await slowDevice(cs, 130);
    const seen = await scan(dev, cs, offsets);
    expect(seen).toEqual(offsets.map((o) => ((o / cs) % 251) + 1));
    expect(reads()).toBe(4);
    expect(most()).toBeLessThanOrEqual(2);
  });
});
