/** Hostile QED input: every table-entry class refused with the entry named, and random mutations. */
import { describe, expect } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { FormatError, ImgconvError } from '../../src/errors.js';
import { qedDriver } from '../../drivers/qed/index.js';
import { buildQed, readOnlyDevice, setU64 } from './qed-support.js';

const ctx = { path: '/mem/image.qed', openRelated: async () => { throw new Error('no related files here'); } };
const CS = 4096;

/** 4 KiB clusters, table_size 1: L1 at 4K, L2 of entry 0 at 8K, data of guest clusters 0, 1 at 12K, 16K; L2 of entry 1 at 20K, data at 24K. */
function sample() {
  return buildQed({
    clusterSize: CS,
    tableSize: 1,
    virtualSize: 4 << 20,
    clusters: new Map<number, number | 'zero'>([[0, 0x10], [1, 0x20], [2, 'zero'], [512, 0x30]]),
  });
}

async function expectRefused(bytes: Uint8Array, field: string, corruptions: number) {
  const img = await qedDriver.open(readOnlyDevice(bytes), ctx);
  const e = await img.mapping().then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(FormatError);
  expect((e as FormatError).field).toBe(field);
  await expect(img.hostSpace()).rejects.toBeInstanceOf(FormatError);
  const r = await img.check();
  expect(r.corruptions).toBe(corruptions);
  expect(r.messages.length).toBeGreaterThan(0);
}

describe('invalid table entries name the table and the index', () => {
  const l1Cases: [string, bigint, number][] = [
    ['L1 entry unaligned', 8192n + 8n, 1],
    ['L1 entry in the header area', 0x800n, 1],
    ['L1 entry past the end of the file', 1n << 30n, 1],
    ['L1 entry beyond 2^53', 1n << 60n, 1],
    ['L1 entry 1 (zero marker)', 1n, 1],
    ['L1 entry pointing at the L1 table', 4096n, 1],
    // The L2 of entry 0 is at 8K: entry 3 pointing there shares its cluster.
    ['L1 entry sharing an L2 table', 8192n, 1],
  ];
  for (const [name, value, corruptions] of l1Cases) {
    test(name, async () => {
      const img = sample();
      setU64(img.bytes, img.l1Offset + 3 * 8, value);
      await expectRefused(img.bytes, 'L1 table entry 3', corruptions);
    });
  }

  const l2Cases: [string, bigint][] = [
    ['L2 entry unaligned', 12288n + 512n],
    ['L2 entry past the end of the file', 1n << 30n],
    ['L2 entry beyond 2^53', (1n << 64n) - 1n],
    ['L2 entry pointing into the L1 table', 4096n],
  ];
  for (const [name, value] of l2Cases) {
    test(name, async () => {
      const img = sample();
      setU64(img.bytes, img.l2Offsets.get(0)! + 7 * 8, value);
      await expectRefused(img.bytes, 'L2 table 0 entry 7', 1);
    });
  }

  test('L2 entry inside a two-cluster header area', async () => {
    const img = buildQed({ clusterSize: CS, tableSize: 1, headerSize: 2, virtualSize: 4 << 20, clusters: new Map([[0, 0x10]]) });
    expect(img.l1Offset).toBe(2 * CS);
    setU64(img.bytes, img.l2Offsets.get(0)! + 7 * 8, BigInt(CS));
    await expectRefused(img.bytes, 'L2 table 0 entry 7', 1);
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    await expect(q.mapping()).rejects.toThrow(/header area/);
  });

  test('an L2 entry pointing into another L2 table', async () => {
    const img = sample();
    setU64(img.bytes, img.l2Offsets.get(0)! + 7 * 8, BigInt(img.l2Offsets.get(1)!));
    await expectRefused(img.bytes, 'L2 table 0 entry 7', 1);
  });

  test('entries past the virtual size still count, and still must be valid', async () => {
    // 4 MiB virtual = 1024 clusters; L2 table 1 covers clusters 512..1023, so L1 entry 5 is past the end.
    const img = sample();
    const bytes = new Uint8Array(img.bytes.length + 2 * CS);
    bytes.set(img.bytes);
    const l2 = img.bytes.length;
    setU64(bytes, img.l1Offset + 5 * 8, BigInt(l2));
    setU64(bytes, l2, BigInt(l2 + CS));
    const q = await qedDriver.open(readOnlyDevice(bytes), ctx);
    const hs = await q.hostSpace();
    expect(hs.ranges().some((r) => r.what === 'data cluster past the virtual size' && r.start === l2 + CS)).toBe(true);
    expect(await q.check()).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 4 });
    setU64(bytes, l2 + 8, 3n);
    await expectRefused(bytes, 'L2 table 5 entry 1', 1);
  });

  test('many invalid entries: one error, a bounded message list', async () => {
    const img = buildQed({ clusterSize: CS, tableSize: 16, virtualSize: 64 << 20, clusters: new Map([[0, 1]]) });
    const l2 = img.l2Offsets.get(0)!;
    for (let j = 1; j < 8192; j++) setU64(img.bytes, l2 + j * 8, 3n);
    const q = await qedDriver.open(readOnlyDevice(img.bytes), ctx);
    await expect(q.mapping()).rejects.toThrow(/and 8190 more invalid table entries/);
    const r = await q.check();
    expect(r.corruptions).toBe(8191);
    expect(r.messages.length).toBe(1001);
  });
});

describe('random mutations never escape as anything but ImgconvError, never write, never hang', () => {
  const base = sample().bytes;
  // Where to hit: the header, the L1 table and the first L2 table (entries are the interesting part).
  const region = fc.oneof(
    fc.integer({ min: 0, max: 63 }),
    fc.integer({ min: 4096, max: 4096 + 64 }),
    fc.integer({ min: 8192, max: 8192 + 64 }),
  );
  const mutation = fc.oneof(
    fc.record({ at: region, byte: fc.integer({ min: 0, max: 255 }) }).map((m) => ({ kind: 'byte' as const, ...m })),
    fc
      .record({ at: region.map((a) => a & ~7), value: fc.oneof(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), fc.constantFrom(0n, 1n, 4096n, 8192n, 12288n, 2n ** 53n, 2n ** 63n)) })
      .map((m) => ({ kind: 'u64' as const, ...m })),
  );

  test.prop([fc.array(mutation, { minLength: 1, maxLength: 6 })], { numRuns: 300 })('open, mapping, hostSpace, check', async (muts) => {
    const bytes = base.slice();
    for (const m of muts) {
      if (m.kind === 'byte') bytes[m.at] = m.byte;
      else setU64(bytes, m.at, m.value);
    }
    const started = Date.now();
    try {
      const img = await qedDriver.open(readOnlyDevice(bytes), ctx);
      await img.check();
      await img.mapping();
      await img.hostSpace();
    } catch (e) {
      if (!(e instanceof ImgconvError)) throw e;
    }
    expect(Date.now() - started).toBeLessThan(2000);
  });
});
