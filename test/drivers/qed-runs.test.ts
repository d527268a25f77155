/**
 * QED tables are scanned by runs (forEachRun): entries that continue each other are checked and mapped
 * as one. These tests pin that a run is exactly its entries — the same visits as entry by entry, and
 * a run with any bad entry in it reported entry by entry, exactly as if it had been read one at a time.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { FormatError } from '../../src/errors.js';
import { forEachEntry, forEachRun } from '../../drivers/qed/tables.js';
import { qedDriver } from '../../drivers/qed/index.js';
import { buildQed, readOnlyDevice, setU64 } from './qed-support.js';

const ctx = { path: '/mem/image.qed', openRelated: async () => { throw new Error('no related files here'); } };
const CS = 4096;

describe('forEachRun visits exactly the entries forEachEntry visits', () => {
  // Pieces of a table: zeros, zero-cluster markers, back-to-back clusters, odd values, values past 2^53.
  const piece = fc.oneof(
    fc.record({ kind: fc.constant('zeros' as const), n: fc.integer({ min: 1, max: 40 }) }),
    fc.record({ kind: fc.constant('markers' as const), n: fc.integer({ min: 1, max: 40 }) }),
    fc.record({ kind: fc.constant('run' as const), n: fc.integer({ min: 1, max: 40 }), start: fc.integer({ min: 0, max: 1 << 20 }) }),
    fc.record({ kind: fc.constant('value' as const), v: fc.oneof(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), fc.constantFrom(1n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 4096n)) }),
  );

  test.prop([fc.array(piece, { maxLength: 40 }), fc.constantFrom(512, 4096, 65536)], { numRuns: 200 })('random tables', async (pieces, cs) => {
    const entries: bigint[] = [];
    for (const p of pieces) {
      if (p.kind === 'zeros') for (let k = 0; k < p.n; k++) entries.push(0n);
      else if (p.kind === 'markers') for (let k = 0; k < p.n; k++) entries.push(1n);
      else if (p.kind === 'run') for (let k = 0; k < p.n; k++) entries.push(BigInt(p.start * cs + k * cs));
      else entries.push(p.v);
    }
    // Three megabytes of table: runs must also be right across the 1 MiB pieces it is read in.
    const bytes = 3 << 20;
    const dev = new MemoryBlockDevice('/mem/t');
    const buf = new Uint8Array(entries.length * 8);
    entries.forEach((e, i) => new DataView(buf.buffer).setBigUint64(i * 8, e, true));
    const at = (1 << 20) - 8 * Math.min(entries.length, 17); // straddle the first piece boundary
    await dev.write(buf, at);
    await dev.truncate(bytes);
    const want: string[] = [];
    await forEachEntry(dev, 0, bytes, (i, value, big) => want.push(`${i}:${value}:${big ?? ''}`));
    const got: string[] = [];
    await forEachRun(dev, 0, bytes, cs, (i, count, value, big) => {
      expect(count).toBeGreaterThan(0);
      if (big !== undefined) expect(count).toBe(1);
      for (let k = 0; k < count; k++) got.push(`${i + k}:${value === 1 ? 1 : value + k * cs}:${big ?? ''}`);
    });
    expect(got).toEqual(want);
  });
});

/** Guest clusters 0..n-1 as data, back to back after the one L2 table: one run of n entries. */
function contiguous(n: number) {
  const clusters = new Map<number, number>();
  for (let g = 0; g < n; g++) clusters.set(g, 0x10 + g);
  return buildQed({ clusterSize: CS, tableSize: 1, virtualSize: 4 << 20, clusters });
}

async function refusal(bytes: Uint8Array): Promise<FormatError> {
  const img = await qedDriver.open(readOnlyDevice(bytes), ctx);
  const e = await img.mapping().then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(FormatError);
  return e as FormatError;
}

describe('a run with bad entries is judged entry by entry', () => {
  it('a clean run maps as one data run and checks clean', async () => {
    const img = contiguous(8);
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    const map = await q.mapping();
    expect(map.at(0)).toEqual({ guest: 0, length: 8 * CS, kind: 'data', host: img.dataOffsets.get(0) });
    expect(await q.check()).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 8, fragmentedClusters: 0 });
  });

  it('a run whose last clusters lie past the end of the file: only those entries', async () => {
    const img = contiguous(8);
    const cut = img.bytes.subarray(0, img.dataOffsets.get(6)!); // clusters of guest 6 and 7 gone
    const e = await refusal(cut);
    expect(e.field).toBe('L2 table 0 entry 6');
    expect(e.reason).toMatch(/and 1 more invalid/);
    const r = await (await qedDriver.open(readOnlyDevice(cut), ctx)).check();
    expect(r).toMatchObject({ corruptions: 2, allocatedClusters: 8, fragmentedClusters: 0 });
  });

  it('a run that crosses the L2 table: only the entry inside it', async () => {
    const img = contiguous(4);
    const l2 = img.l2Offsets.get(0)!;
    // Entries 0..2 continue each other across [l2, l2 + CS): data before it, the table, data after it.
    // The cluster before the table is the L1 table in this layout, so start the run one further in.
    for (let j = 0; j < 3; j++) setU64(img.bytes, l2 + j * 8, BigInt(l2 + j * CS));
    const e = await refusal(img.bytes);
    expect(e.field).toBe('L2 table 0 entry 0');
    expect(e.reason).toMatch(/points into the L2 table of L1 entry 0/);
    expect(e.reason).not.toMatch(/more invalid/);
  });

  it('two runs over the same clusters: each cluster referenced twice is one corruption', async () => {
    const img = contiguous(8);
    const l2 = img.l2Offsets.get(0)!;
    // Entries 4..7 repeat the clusters of entries 1..4: 4 clusters referenced twice (cluster of entry 4
    // three times: entry 4 itself comes after entry 1's run covers it).
    for (let j = 4; j < 8; j++) setU64(img.bytes, l2 + j * 8, BigInt(img.dataOffsets.get(j - 3)!));
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    const r = await q.check();
    // Entries 0..3 mark clusters 0..3; entries 4..7 hit clusters 1..4, of which 1..3 are taken.
    expect(r.corruptions).toBe(3);
    expect(r.allocatedClusters).toBe(8);
    expect(r.fragmentedClusters).toBe(1);
    // The data clusters of guest 5..7 are referenced by nothing now.
    expect(r.leaks).toBe(3);
  });

  it('fragmented counts where a run does not follow the previous one', async () => {
    const img = contiguous(8);
    const l2 = img.l2Offsets.get(0)!;
    // Swap the halves: entries 0..3 → clusters of guest 4..7, entries 4..7 → guest 0..3.
    for (let j = 0; j < 8; j++) setU64(img.bytes, l2 + j * 8, BigInt(img.dataOffsets.get((j + 4) % 8)!));
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    expect(await q.check()).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 8, fragmentedClusters: 1 });
    const map = await q.mapping();
    expect(map.at(0)).toMatchObject({ guest: 0, length: 4 * CS, host: img.dataOffsets.get(4) });
    expect(map.at(1)).toMatchObject({ guest: 4 * CS, length: 4 * CS, host: img.dataOffsets.get(0) });
  });

  it('a run of zero-cluster markers maps as one zero run', async () => {
    const clusters = new Map<number, number | 'zero'>();
    for (let g = 0; g < 6; g++) clusters.set(g, 'zero');
    const img = buildQed({ clusterSize: CS, tableSize: 1, virtualSize: 4 << 20, clusters });
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    const map = await q.mapping();
    expect(map.at(0)).toEqual({ guest: 0, length: 6 * CS, kind: 'zero' });
    expect(q.info.details?.['zero-clusters']).toBe(6);
    expect(await q.check()).toMatchObject({ corruptions: 0, allocatedClusters: 0 });
  });
});
