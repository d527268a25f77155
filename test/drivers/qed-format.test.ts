/** QED codecs, header validation and table decoding on images built in memory. */
import { describe, expect } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import { decodeHeader, encodeHeader, validateHeader, type QedHeader } from '../../drivers/qed/header.js';
import { decodeTable, encodeTable } from '../../drivers/qed/tables.js';
import { qedDriver } from '../../drivers/qed/index.js';
import { buildQed, readOnlyDevice, setU64 } from './qed-support.js';

const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const headerArb: fc.Arbitrary<QedHeader> = fc.record({
  magic: fc.constant('QED\0'),
  clusterSize: u32,
  tableSize: u32,
  headerSize: u32,
  features: u64,
  compatFeatures: u64,
  autoclearFeatures: u64,
  l1TableOffset: u64,
  imageSize: u64,
  backingFilenameOffset: u32,
  backingFilenameSize: u32,
});

const ctx = { path: '/mem/image.qed', openRelated: async () => { throw new Error('no related files here'); } };
const open = (bytes: Uint8Array) => qedDriver.open(readOnlyDevice(bytes), ctx);

async function openError(bytes: Uint8Array): Promise<unknown> {
  try {
    const img = await open(bytes);
    await img.mapping();
  } catch (e) {
    return e;
  }
  throw new Error('expected the image to be refused');
}

describe('codecs', () => {
  test.prop([headerArb])('header round-trips', (h) => {
    expect(decodeHeader(encodeHeader(h))).toEqual(h);
  });
  test.prop([fc.array(u64, { maxLength: 512 })])('table round-trips', (entries) => {
    const bytes = encodeTable(entries, 4096);
    const back = decodeTable(bytes);
    expect(back.slice(0, entries.length)).toEqual(entries);
    expect(back.slice(entries.length).every((e) => e === 0n)).toBe(true);
  });
});

describe('probe', () => {
  const probe = (head: Uint8Array) => qedDriver.probe({ head, tail: new Uint8Array(), size: head.length, path: 'x' });
  test('magic and a whole header score 100', () => {
    expect(probe(buildQed().bytes.subarray(0, 64))).toBe(100);
  });
  test('short or foreign bytes score 0', () => {
    expect(probe(buildQed().bytes.subarray(0, 63))).toBe(0);
    expect(probe(new Uint8Array(512))).toBe(0);
    const qcow = new Uint8Array(512);
    qcow.set([0x51, 0x46, 0x49, 0xfb]);
    expect(probe(qcow)).toBe(0);
  });
});

describe('header validation names the field', () => {
  const cases: [string, Partial<QedHeader>, string][] = [
    ['bad magic', { magic: 'QEE\0' }, 'magic'],
    ['cluster size not a power of two', { clusterSize: 6144 }, 'cluster_size'],
    ['cluster size below 4 KiB', { clusterSize: 2048 }, 'cluster_size'],
    ['cluster size above 64 MiB', { clusterSize: 128 * 1024 * 1024 }, 'cluster_size'],
    ['table size 0', { tableSize: 0 }, 'table_size'],
    ['table size 3', { tableSize: 3 }, 'table_size'],
    ['table size 32', { tableSize: 32 }, 'table_size'],
    ['image size not a sector multiple', { imageSize: 1000n }, 'image_size'],
    ['image size past the addressable maximum', { imageSize: (512n * 512n * 4096n) + 512n }, 'image_size'],
    ['header size 0', { headerSize: 0 }, 'header_size'],
    ['header area overflowing 32 bits', { headerSize: 0x100000 }, 'header_size'],
    ['L1 unaligned', { l1TableOffset: 4096n + 8n }, 'l1_table_offset'],
    ['L1 in the header area', { l1TableOffset: 0n }, 'l1_table_offset'],
    ['L1 past the end of the file', { l1TableOffset: 4096n * 10n }, 'l1_table_offset'],
    ['L1 past 2^64 territory', { l1TableOffset: 2n ** 63n }, 'l1_table_offset'],
    ['backing name past the header area', { features: 1n, backingFilenameOffset: 4000, backingFilenameSize: 200 }, 'backing_filename_offset'],
    ['backing name longer than QEMU allows', { features: 1n, headerSize: 2, l1TableOffset: 8192n, backingFilenameOffset: 64, backingFilenameSize: 4096 }, 'backing_filename_size'],
  ];
  for (const [name, patch, field] of cases) {
    test(name, async () => {
      const img = buildQed({ tableSize: 1, virtualSize: 1 << 20 });
      // table_size 1 with 4 KiB clusters addresses (512)²·4096 bytes = 1 GiB.
      const bytes = img.bytes;
      const h = { ...img.header, ...patch };
      const big = new Uint8Array(Math.max(bytes.length, 3 * 4096));
      big.set(bytes);
      big.set(encodeHeader(h), 0);
      const e = await openError(big);
      expect(e).toBeInstanceOf(FormatError);
      expect((e as FormatError).field).toBe(field);
    });
  }

  test('unknown feature bits are UnsupportedError naming the bit', async () => {
    const img = buildQed();
    img.bytes.set(encodeHeader({ ...img.header, features: 0x28n }), 0);
    const e = await openError(img.bytes);
    expect(e).toBeInstanceOf(UnsupportedError);
    expect((e as UnsupportedError).feature).toBe('feature bits 3, 5');
  });

  test('a file shorter than the header', async () => {
    const e = await openError(buildQed().bytes.subarray(0, 40));
    expect(e).toBeInstanceOf(FormatError);
    expect((e as FormatError).field).toBe('header');
  });

  test('unknown compat and autoclear bits are accepted and reported', async () => {
    const img = buildQed();
    img.bytes.set(encodeHeader({ ...img.header, compatFeatures: 0x10n, autoclearFeatures: 1n << 63n }), 0);
    const q = await open(img.bytes);
    expect(q.info.details['compat-features']).toBe(16);
    expect(q.info.details['autoclear-features']).toBe('0x8000000000000000');
    expect(q.info.features.join('; ')).toMatch(/compatible features 0x10.*autoclear features 0x8000000000000000/);
  });

  test('validateHeader keeps the maximum image size exact (2^53 is the limit for numbers)', () => {
    const h = { ...buildQed().header, clusterSize: 64 << 20, tableSize: 16, imageSize: 2n ** 60n };
    expect(() => validateHeader(h, 1 << 30)).toThrow(/image_size.*2\^53/);
  });
});

describe('images built in memory (table_size 1, which qemu-img creates but cannot open)', () => {
  test('data, zero and unallocated clusters, partial last cluster', async () => {
    const cs = 4096;
    const clusters = new Map<number, number | 'zero'>([
      [0, 0xaa],
      [1, 0xbb],
      [3, 'zero'],
      [600, 0xcc], // second L2 table (512 entries each)
      [1023, 0xdd], // last cluster, partial
    ]);
    const virtualSize = 1023 * cs + 1536;
    const img = buildQed({ clusterSize: cs, tableSize: 1, virtualSize, clusters });
    const q = await open(img.bytes);
    expect(q.info.virtualSize).toBe(virtualSize);
    expect(q.info.features).toContain('zero clusters');
    const map = (await q.mapping()).toArray();
    expect(map).toEqual([
      { guest: 0, length: 2 * cs, kind: 'data', host: img.dataOffsets.get(0) },
      { guest: 2 * cs, length: cs, kind: 'unallocated' },
      { guest: 3 * cs, length: cs, kind: 'zero' },
      { guest: 4 * cs, length: 596 * cs, kind: 'unallocated' },
      { guest: 600 * cs, length: cs, kind: 'data', host: img.dataOffsets.get(600) },
      { guest: 601 * cs, length: 422 * cs, kind: 'unallocated' },
      { guest: 1023 * cs, length: 1536, kind: 'data', host: img.dataOffsets.get(1023) },
    ]);
    const reader = await GuestReader.create([q]);
    expect((await reader.read(cs - 2, 4))).toEqual(new Uint8Array([0xaa, 0xaa, 0xbb, 0xbb]));
    expect((await reader.read(virtualSize - 1, 1))[0]).toBe(0xdd);
    const hs = await q.hostSpace();
    // The last data cluster is whole on the host, although the guest sees 1536 bytes of it.
    expect(hs.free()).toEqual([]);
    expect(hs.totals()).toEqual({ header: cs, metadata: 3 * cs, data: 4 * cs });
    const r = await q.check();
    expect(r).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0, allocatedClusters: 4, totalClusters: 1024, fragmentedClusters: 0 });
  });

  test('backing name, NUL-terminated early, and NO_PROBE', async () => {
    const img = buildQed({ backingName: 'base.raw\0junk' });
    img.bytes.set(encodeHeader({ ...img.header, features: 1n | 4n }), 0);
    const q = await open(img.bytes);
    expect(q.info.backing).toEqual({ filename: 'base.raw', format: 'raw' });
    const img2 = buildQed({ backingName: 'base.qed' });
    expect((await open(img2.bytes)).info.backing).toEqual({ filename: 'base.qed' });
  });

  test('an empty backing name means no backing file, as in QEMU', async () => {
    const img = buildQed();
    img.bytes.set(encodeHeader({ ...img.header, features: 1n }), 0);
    expect((await open(img.bytes)).info.backing).toBeUndefined();
  });

  test('NEED_CHECK makes the image dirty', async () => {
    const img = buildQed();
    img.bytes.set(encodeHeader({ ...img.header, features: 2n }), 0);
    const q = await open(img.bytes);
    expect(q.info.dirty).toBe(true);
    expect(q.info.details['need-check']).toBe(true);
  });

  test('a huge sparse L1 in a file hole is skipped without reading it', async () => {
    // 64 MiB clusters × table_size 16: a 1 GiB L1 table, all in a hole of a sparse memory device.
    const cs = 64 << 20;
    const { MemoryBlockDevice } = await import('../../src/blockdev/memory.js');
    const { NoWriteDevice } = await import('../support/devices.js');
    const mem = new MemoryBlockDevice('/mem/huge.qed');
    const h = { ...buildQed().header, clusterSize: cs, tableSize: 16, l1TableOffset: BigInt(cs), imageSize: 2n ** 50n };
    mem.writeSync(encodeHeader(h), 0);
    await mem.truncate(cs + 16 * cs);
    const q = await qedDriver.open(new NoWriteDevice(mem), ctx);
    expect((await q.mapping()).toArray()).toEqual([{ guest: 0, length: 2 ** 50, kind: 'unallocated' }]);
    expect((await q.check()).leaks).toBe(0);
  });

  test('setU64 helper writes little-endian', () => {
    const b = new Uint8Array(8);
    setU64(b, 0, 0x0102n);
    expect([...b.subarray(0, 2)]).toEqual([2, 1]);
  });
});
