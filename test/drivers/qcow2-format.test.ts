/** qcow2 codecs (round-trip properties), probe, and the driver on an image built in memory. */
import { describe, expect } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { createHash } from 'node:crypto';
import { GuestReader } from '../../src/guest.js';
import { decodeBitmapDirectory, encodeBitmapDirectory, type BitmapDirEntry } from '../../drivers/qcow2/bitmaps.js';
import {
  compressedLength,
  decodeL1Entry,
  decodeL2Entry,
  decodeReftableEntry,
  decodeSubclusterBitmap,
  encodeL1Entry,
  encodeL2Entry,
  encodeReftableEntry,
  encodeSubclusterBitmap,
  getRefcount,
  setRefcount,
  type L2Entry,
} from '../../drivers/qcow2/entries.js';
import {
  decodeBitmapsExtension,
  decodeCryptoExtension,
  decodeExtensions,
  decodeFeatureTable,
  encodeBitmapsExtension,
  encodeCryptoExtension,
  encodeExtensions,
  encodeFeatureTable,
  type HeaderExtension,
} from '../../drivers/qcow2/extensions.js';
import { decodeHeader, encodeHeader, type Qcow2Header } from '../../drivers/qcow2/header.js';
import { decodeSnapshotTable, encodeSnapshotTable, type Qcow2Snapshot } from '../../drivers/qcow2/snapshots.js';
import { qcow2Driver } from '../../drivers/qcow2/index.js';
import { BUILT, buildImage, builtGuest, openBytes } from './qcow2-support.js';

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const safe = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER });
const clusterOffset = (bits: number) => fc.integer({ min: 0, max: 2 ** (53 - bits) - 1 }).map((n) => n * 2 ** bits);

const headerArb: fc.Arbitrary<Qcow2Header> = fc.oneof(
  fc.record({
    version: fc.constant(2),
    backingFileOffset: safe, backingFileSize: u32, clusterBits: u32, size: safe, cryptMethod: u32, l1Size: u32,
    l1TableOffset: safe, refcountTableOffset: safe, refcountTableClusters: u32, nbSnapshots: u32, snapshotsOffset: safe,
    incompatibleFeatures: fc.constant(0n), compatibleFeatures: fc.constant(0n), autoclearFeatures: fc.constant(0n),
    refcountOrder: fc.constant(4), headerLength: fc.constant(72), compressionType: fc.constant(0),
  }),
  fc.record({
    version: fc.constant(3),
    backingFileOffset: safe, backingFileSize: u32, clusterBits: u32, size: safe, cryptMethod: u32, l1Size: u32,
    l1TableOffset: safe, refcountTableOffset: safe, refcountTableClusters: u32, nbSnapshots: u32, snapshotsOffset: safe,
    incompatibleFeatures: u64, compatibleFeatures: u64, autoclearFeatures: u64, refcountOrder: u32,
    headerLength: fc.integer({ min: 105, max: 4096 }), compressionType: fc.integer({ min: 0, max: 255 }),
  }),
);

describe('codecs round-trip', () => {
  test.prop([headerArb])('header', (h) => {
    expect(decodeHeader(encodeHeader(h))).toEqual(h);
  });
  test.prop([fc.array(fc.record({ type: fc.integer({ min: 1, max: 0xffffffff }), data: fc.uint8Array({ maxLength: 64 }) }), { maxLength: 6 })])(
    'extension area',
    (exts: HeaderExtension[]) => {
      const area = encodeExtensions(exts);
      expect(decodeExtensions(area, 0, area.length)).toEqual(exts);
    },
  );
  test.prop([fc.array(fc.record({ type: fc.integer({ min: 0, max: 2 }), bit: fc.integer({ min: 0, max: 63 }), name: fc.stringMatching(/^[a-z ]{0,46}$/) }), { maxLength: 8 })])(
    'feature-name table',
    (names) => {
      expect(decodeFeatureTable(encodeFeatureTable(names))).toEqual(names);
    },
  );
  test.prop([fc.record({ nbBitmaps: u32, reserved: u32, directorySize: safe, directoryOffset: safe })])('bitmaps extension', (e) => {
    expect(decodeBitmapsExtension(encodeBitmapsExtension(e))).toEqual(e);
  });
  test.prop([fc.record({ offset: safe, length: safe })])('crypto extension', (e) => {
    expect(decodeCryptoExtension(encodeCryptoExtension(e))).toEqual(e);
  });
  test.prop([fc.record({ l2Offset: clusterOffset(9).filter((o) => o < 2 ** 53), copied: fc.boolean(), reserved: fc.constantFrom(0n, 1n, 0x100n, 1n << 56n, 1n << 62n) })])(
    'L1 entry',
    (e) => {
      const [hi, lo] = encodeL1Entry(e);
      expect(decodeL1Entry(hi, lo)).toEqual(e);
    },
  );
  const l2Arb = (bits: number): fc.Arbitrary<L2Entry> =>
    fc.oneof(
      fc.record({ compressed: fc.constant(false as const), copied: fc.boolean(), offset: clusterOffset(9), zero: fc.boolean(), reserved: fc.constantFrom(0n, 2n, 0x100n, 1n << 56n, 1n << 61n) }),
      fc.record({
        compressed: fc.constant(true as const),
        copied: fc.boolean(),
        hostOffset: fc.integer({ min: 0, max: Math.min(2 ** (62 - (bits - 8)), 2 ** 53) - 1 }),
        extraSectors: fc.integer({ min: 0, max: 2 ** (bits - 8) - 1 }),
      }),
    );
  for (const bits of [9, 12, 16, 21]) {
    test.prop([l2Arb(bits)])(`L2 entry, cluster_bits ${bits}`, (e) => {
      const [hi, lo] = encodeL2Entry(e, bits);
      expect(decodeL2Entry(hi, lo, bits)).toEqual(e);
    });
  }
  test('compressed length follows QEMU (sectors minus the offset into the first sector)', () => {
    expect(compressedLength({ compressed: true, copied: false, hostOffset: 1000, extraSectors: 2 })).toBe(3 * 512 - (1000 % 512));
  });
  test.prop([fc.record({ alloc: u32, zero: u32 })])('subcluster bitmap', (b) => {
    const [hi, lo] = encodeSubclusterBitmap(b);
    expect(decodeSubclusterBitmap(hi, lo)).toEqual(b);
  });
  test.prop([fc.record({ offset: clusterOffset(9), reserved: fc.integer({ min: 0, max: 511 }) })])('refcount table entry', (e) => {
    const [hi, lo] = encodeReftableEntry(e);
    expect(decodeReftableEntry(hi, lo)).toEqual(e);
  });
  test.prop([fc.integer({ min: 0, max: 6 }), fc.array(fc.nat(), { minLength: 1, maxLength: 64 })])('refcount block entries', (order, raw) => {
    const block = new Uint8Array(512);
    const max = order >= 5 ? 2 ** 31 : 2 ** (1 << order) - 1;
    const values = raw.map((v) => v % (max + 1));
    values.forEach((v, i) => setRefcount(block, i, order, v));
    expect(values.map((_, i) => getRefcount(block, i, order))).toEqual(values);
  });
  const snapArb: fc.Arbitrary<Qcow2Snapshot> = fc.record({
    l1TableOffset: safe, l1Size: u32, id: fc.stringMatching(/^[0-9]{0,4}$/), name: fc.stringMatching(/^[a-z0-9]{0,12}$/),
    dateSec: u32, dateNsec: u32, vmClockNsec: u64, vmStateSize: u32, extraData: fc.uint8Array({ maxLength: 40 }),
  });
  test.prop([fc.array(snapArb, { maxLength: 5 })])('snapshot table', (snaps) => {
    const bytes = encodeSnapshotTable(snaps);
    expect(decodeSnapshotTable(bytes, snaps.length)).toEqual({ snapshots: snaps, size: bytes.length });
  });
  const bmArb: fc.Arbitrary<BitmapDirEntry> = fc.record({
    tableOffset: safe, tableSize: u32, flags: u32, type: fc.integer({ min: 0, max: 255 }), granularityBits: fc.integer({ min: 0, max: 255 }),
    name: fc.stringMatching(/^[a-z0-9]{1,20}$/), extraData: fc.uint8Array({ maxLength: 16 }),
  });
  test.prop([fc.array(bmArb, { minLength: 1, maxLength: 5 })])('bitmap directory', (entries) => {
    expect(decodeBitmapDirectory(encodeBitmapDirectory(entries), entries.length)).toEqual(entries);
  });
});

describe('probe', () => {
  const probe = (head: Uint8Array) => qcow2Driver.probe({ head, tail: new Uint8Array(), size: head.length, path: 'x' });
  test('magic with version 2 or 3 scores 100', () => {
    const h = buildImage().subarray(0, 512);
    expect(probe(h)).toBe(100);
    const v2 = h.slice();
    v2[7] = 2;
    expect(probe(v2)).toBe(100);
  });
  test('other versions, short or foreign bytes score 0', () => {
    const v1 = buildImage().subarray(0, 512).slice();
    v1[7] = 1;
    expect(probe(v1)).toBe(0);
    expect(probe(new Uint8Array([0x51, 0x46, 0x49]))).toBe(0);
    expect(probe(new Uint8Array(512))).toBe(0);
  });
});

describe('an image built in memory', () => {
  test('mapping: data, zero, compressed, preallocated zero, unallocated', async () => {
    const img = await openBytes(buildImage());
    const cs = BUILT.cs;
    expect((await img.mapping()).toArray()).toEqual([
      { guest: 0, length: cs, kind: 'data', host: 5 * cs },
      { guest: cs, length: cs, kind: 'unallocated' },
      { guest: 2 * cs, length: cs, kind: 'data', host: 6 * cs },
      { guest: 3 * cs, length: cs, kind: 'zero' },
      { guest: 4 * cs, length: cs, kind: 'compressed', host: 7 * cs, hostLength: (await img.mapping()).at(4).hostLength },
      { guest: 5 * cs, length: cs, kind: 'zero', host: 8 * cs },
      { guest: 6 * cs, length: BUILT.size - 6 * cs, kind: 'unallocated' },
    ]);
    expect(img.info.features).toEqual(['zero clusters', 'compressed clusters']);
  });
  test('guest content through GuestReader (compressed cluster inflated)', async () => {
    const img = await openBytes(buildImage());
    const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
    expect(await (await GuestReader.create([img])).sha256()).toBe(sha(builtGuest()));
  });
  test('check is clean and host space accounts for every cluster', async () => {
    const img = await openBytes(buildImage());
    const r = await img.check();
    expect([r.corruptions, r.leaks, r.checkErrors]).toEqual([0, 0, 0]);
    expect(r.imageEndOffset).toBe(BUILT.clusters * BUILT.cs);
    expect(r.allocatedClusters).toBe(4);
    expect(r.compressedClusters).toBe(1);
    const hs = await img.hostSpace();
    expect(hs.free()).toEqual([{ start: 7 * BUILT.cs + (await img.mapping()).at(4).hostLength!, length: BUILT.cs - (await img.mapping()).at(4).hostLength! }]);
  });
  test('a partial last cluster maps only up to the virtual size', async () => {
    const b = buildImage();
    new DataView(b.buffer).setBigUint64(24, BigInt(5 * BUILT.cs + 1024));
    const img = await openBytes(b);
    const m = await img.mapping();
    expect(m.virtualSize).toBe(5 * BUILT.cs + 1024);
    expect(m.at(m.count - 1)).toEqual({ guest: 5 * BUILT.cs, length: 1024, kind: 'zero', host: 8 * BUILT.cs });
  });
});
