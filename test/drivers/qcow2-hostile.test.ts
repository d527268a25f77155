/**
 * Hostile qcow2 input: every header field and table entry class with a bad value is refused with a
 * FormatError naming the field (or an UnsupportedError for valid-but-unsupported features), and
 * random mutations of a valid image never produce anything but an ImgconvError, never write, and
 * finish quickly.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { FormatError, ImgconvError, UnsupportedError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import { encodeL2Entry } from '../../drivers/qcow2/entries.js';
import { EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, encodeExtensions } from '../../drivers/qcow2/extensions.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';
import { BUILT, buildImage, getU64, openBytes, qemuImg, qemuIoIn, setU32, setU64 } from './qcow2-support.js';

const haveQemu = qemuAvailable();

type Patch = (b: Uint8Array) => Uint8Array | void;

async function failure(bytes: Uint8Array): Promise<unknown> {
  try {
    const img = await openBytes(bytes);
    await img.mapping();
    await img.hostSpace();
  } catch (e) {
    return e;
  }
  throw new Error('expected the image to be refused');
}

const withExt = (exts: { type: number; data: Uint8Array }[]): Patch => (b) => {
  b.fill(0, 112, 4096);
  b.set(encodeExtensions(exts), 112);
};

const grow = (b: Uint8Array, clusters: number) => {
  const out = new Uint8Array(b.length + clusters * BUILT.cs);
  out.set(b);
  return out;
};

/** [description, patch, expected field] */
const formatCases: [string, Patch, string][] = [
  ['magic', (b) => setU32(b, 0, 0x514649fc), 'magic'],
  ['cluster_bits 8', (b) => setU32(b, 20, 8), 'cluster_bits'],
  ['cluster_bits 22', (b) => setU32(b, 20, 22), 'cluster_bits'],
  ['cluster_bits 2^31', (b) => setU32(b, 20, 0x80000000), 'cluster_bits'],
  ['header_length 96', (b) => setU32(b, 100, 96), 'header_length'],
  ['header_length 108 (not a multiple of 8)', (b) => setU32(b, 100, 108), 'header_length'],
  ['header_length beyond the cluster', (b) => setU32(b, 100, 8192), 'header_length'],
  ['size beyond 2^53', (b) => setU64(b, 24, 1n << 60n), 'size'],
  ['backing_file_offset beyond cluster 0', (b) => { setU64(b, 8, 8192); setU32(b, 16, 4); }, 'backing_file_offset'],
  ['backing_file_size 1024', (b) => { setU64(b, 8, 1024); setU32(b, 16, 1024); }, 'backing_file_size'],
  ['backing name running out of cluster 0', (b) => { setU64(b, 8, 4000); setU32(b, 16, 200); }, 'backing_file_size'],
  ['compression type set without its incompatible bit', (b) => { b[104] = 1; }, 'incompatible_features'],
  ['compression bit without a compression type', (b) => setU64(b, 72, 1n << 3n), 'incompatible_features'],
  ['extended L2 with 4 KiB clusters', (b) => setU64(b, 72, 1n << 4n), 'cluster_bits'],
  ['refcount_order 7', (b) => setU32(b, 96, 7), 'refcount_order'],
  ['crypt_method 3', (b) => setU32(b, 32, 3), 'crypt_method'],
  ['LUKS without its header extension', (b) => setU32(b, 32, 2), 'crypt_method'],
  ['refcount_table_clusters 0', (b) => setU32(b, 56, 0), 'refcount_table_clusters'],
  ['refcount table over 8 MiB', (b) => setU32(b, 56, 2049), 'refcount_table_clusters'],
  ['refcount table past the end of the file', (b) => setU32(b, 56, 100), 'refcount_table_offset'],
  ['refcount_table_offset unaligned', (b) => setU64(b, 48, BUILT.reftable + 8), 'refcount_table_offset'],
  ['refcount_table_offset beyond 2^53', (b) => setU64(b, 48, 1n << 62n), 'refcount_table_offset'],
  ['l1_size too small for the disk', (b) => { setU64(b, 24, 4n << 20n); }, 'l1_size'],
  ['l1_size over 32 MiB', (b) => setU32(b, 36, (32 << 20) / 8 + 1), 'l1_size'],
  ['L1 table past the end of the file', (b) => setU32(b, 36, 4096), 'l1_table_offset'],
  ['l1_table_offset unaligned', (b) => setU64(b, 40, BUILT.l1 + 512), 'l1_table_offset'],
  ['l1_table_offset in cluster 0', (b) => setU64(b, 40, 0), 'l1_table_offset'],
  ['nb_snapshots over 65536', (b) => setU32(b, 60, 65537), 'nb_snapshots'],
  ['snapshots_offset unaligned', (b) => { setU32(b, 60, 1); setU64(b, 64, 4096 + 8); }, 'snapshots_offset'],
  ['snapshot table past the end of the file', (b) => { setU32(b, 60, 3); setU64(b, 64, 9 * 4096); }, 'snapshots_offset'],
  ['snapshot table overlapping data', (b) => { setU32(b, 60, 1); setU64(b, 64, 8 * 4096); }, 'preallocated zero'],
  ['snapshot extra data over 1024 bytes', (b) => {
    const out = grow(b, 1);
    setU32(out, 60, 1);
    setU64(out, 64, 9 * 4096);
    setU32(out, 9 * 4096 + 36, 2000);
    return out;
  }, 'snapshot extra_data_size'],
  ['header extension running past the area', (b) => { setU32(b, 112, 0x1234); setU32(b, 116, 4000); }, 'header extension length'],
  ['backing format of 16 bytes', withExt([{ type: EXT_BACKING_FORMAT, data: new Uint8Array(16).fill(0x61) }]), 'backing format extension length'],
  ['bitmaps extension of the wrong length', (b) => { withExt([{ type: EXT_BITMAPS, data: new Uint8Array(16) }])(b); setU64(b, 88, 1); }, 'bitmaps extension length'],
  ['bitmaps extension with 0 bitmaps', (b) => { withExt([{ type: EXT_BITMAPS, data: new Uint8Array(24) }])(b); setU64(b, 88, 1); }, 'nb_bitmaps'],
  ['crypto extension without LUKS', withExt([{ type: EXT_CRYPTO, data: new Uint8Array(16) }]), 'crypt_method'],
  ['data_file_raw without a data file', (b) => setU64(b, 88, 2), 'autoclear_features'],
  ['empty data file name', (b) => { withExt([{ type: EXT_DATA_FILE, data: new Uint8Array(0) }])(b); setU64(b, 72, 4); }, 'data file extension length'],
  // Table entries.
  ['L1 entry with reserved bits', (b) => setU64(b, BUILT.l1, getU64(b, BUILT.l1) | (1n << 56n)), 'L1 entry'],
  ['L1 entry unaligned', (b) => setU64(b, BUILT.l1, getU64(b, BUILT.l1) + 512n), 'L2 table offset'],
  ['L1 entry past the end of the file', (b) => setU64(b, BUILT.l1, (1n << 63n) | (1n << 40n)), 'L2 table offset'],
  ['L2 entry with reserved bits', (b) => setU64(b, BUILT.l2, getU64(b, BUILT.l2) | 2n), 'L2 entry'],
  ['L2 entry unaligned', (b) => setU64(b, BUILT.l2, getU64(b, BUILT.l2) + 512n), 'data cluster offset'],
  ['L2 entry past the end of the file', (b) => setU64(b, BUILT.l2, (1n << 63n) | (1n << 45n)), 'data cluster offset'],
  ['compressed payload inside the header cluster', (b) => {
    const [hi, lo] = encodeL2Entry({ compressed: true, copied: false, hostOffset: 100, extraSectors: 0 }, 12);
    setU32(b, BUILT.l2 + 32, hi);
    setU32(b, BUILT.l2 + 36, lo);
  }, 'compressed cluster offset'],
  ['compressed entry with COPIED', (b) => setU64(b, BUILT.l2 + 32, getU64(b, BUILT.l2 + 32) | (1n << 63n)), 'L2 entry'],
  ['compressed entry past the end of the file', (b) => {
    const [hi, lo] = encodeL2Entry({ compressed: true, copied: false, hostOffset: 40 * 4096, extraSectors: 0 }, 12);
    setU32(b, BUILT.l2 + 32, hi);
    setU32(b, BUILT.l2 + 36, lo);
  }, 'compressed cluster offset'],
  ['zero flag in a version 2 image', (b) => {
    const v2 = new Uint8Array(b.length);
    v2.set(b);
    setU32(v2, 4, 2);
    v2.fill(0, 72, 4096);
    return v2;
  }, 'L2 entry'],
  ['refcount table entry with reserved bits', (b) => setU64(b, BUILT.reftable, getU64(b, BUILT.reftable) | 4n), 'refcount table entry'],
  ['refcount block unaligned', (b) => setU64(b, BUILT.reftable, getU64(b, BUILT.reftable) + 512n), 'refcount block offset'],
];

describe('hostile header fields and table entries name the field', () => {
  for (const [name, patch, field] of formatCases) {
    test(name, async () => {
      const b = buildImage();
      const out = patch(b) ?? b;
      const err = await failure(out);
      expect(err).toBeInstanceOf(FormatError);
      if (field) expect((err as FormatError).field).toBe(field);
    });
  }
});

describe('unsupported features are UnsupportedError', () => {
  const cases: [string, Patch, RegExp][] = [
    ['version 4', (b) => setU32(b, 4, 4), /version 4/],
    ['unknown incompatible bit, named from the feature table', (b) => { setU64(b, 72, 1n << 9n); b.set(encodeExtensions([{ type: 0x6803f857, data: featureEntry(0, 9, 'frobnication') }]), 112); }, /bit 9 "frobnication"/],
    ['unknown incompatible bit 40', (b) => setU64(b, 72, 1n << 40n), /bit 40/],
    ['compression type 2', (b) => { b[104] = 2; setU64(b, 72, 1n << 3n); }, /compression type 2/],
    ['external data file without a name', (b) => setU64(b, 72, 1n << 2n), /external data file/],
  ];
  for (const [name, patch, msg] of cases) {
    test(name, async () => {
      const b = buildImage();
      patch(b);
      const err = await failure(b);
      expect(err).toBeInstanceOf(UnsupportedError);
      expect((err as Error).message).toMatch(msg);
    });
  }
  test('zstd: mapping works, readCompressed is refused', async () => {
    const b = buildImage();
    b[104] = 1;
    setU64(b, 72, 1n << 3n);
    const img = await openBytes(b);
    expect(img.info.details['compression-type']).toBe('zstd');
    const m = await img.mapping();
    await expect(img.readCompressed!(m.at(4))).rejects.toBeInstanceOf(UnsupportedError);
  });
  test('a corrupt compressed payload is a FormatError', async () => {
    const b = buildImage();
    b.fill(0xff, 7 * BUILT.cs, 7 * BUILT.cs + 64);
    const img = await openBytes(b);
    const err = await img.readCompressed!((await img.mapping()).at(4)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FormatError);
    expect((err as FormatError).field).toBe('compressed cluster');
  });
});

function featureEntry(type: number, bit: number, name: string): Uint8Array {
  const e = new Uint8Array(48);
  e[0] = type;
  e[1] = bit;
  e.set(Buffer.from(name), 2);
  return e;
}

/** Offsets worth mutating: the header and extension start, reftable, refblock, L1, L2 entries. */
const hotOffsets = fc.oneof(
  fc.integer({ min: 0, max: 127 }),
  fc.integer({ min: BUILT.reftable, max: BUILT.reftable + 15 }),
  fc.integer({ min: BUILT.refblock, max: BUILT.refblock + 31 }),
  fc.integer({ min: BUILT.l1, max: BUILT.l1 + 15 }),
  fc.integer({ min: BUILT.l2, max: BUILT.l2 + 63 }),
  fc.integer({ min: 0, max: BUILT.clusters * BUILT.cs - 1 }),
);

describe('mutation fuzz', () => {
  test.prop([fc.array(fc.tuple(hotOffsets, fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 })], { numRuns: 300 })(
    'open + mapping + hostSpace + check + read either succeed or throw an ImgconvError, quickly',
    async (mutations) => {
      const b = buildImage();
      for (const [off, v] of mutations) b[off] = v;
      const started = Date.now();
      try {
        const img = await openBytes(b);
        await img.check();
        await img.hostSpace();
        await (await GuestReader.create([img])).sha256();
      } catch (e) {
        if (!(e instanceof ImgconvError)) throw e;
      }
      expect(Date.now() - started).toBeLessThan(5000);
    },
  );
});

describe.skipIf(!haveQemu)('mutation fuzz on a qemu-made image with snapshots, bitmaps and extended L2', () => {
  const t = withTmpDir('imgconv-qcow2-fuzz-');
  const images: Uint8Array[] = [];
  beforeAll(() => {
    const a = t.path('a.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', a, '2M']);
    qemuIoIn(a, ['write -P 1 0 12k', 'write -z 64k 8k']);
    qemuImg(['snapshot', '-c', 's1', a]);
    qemuIoIn(a, ['write -P 2 4k 4k', 'write -P 3 1M 4k']);
    qemuImg(['bitmap', '--add', a, 'b0']);
    images.push(new Uint8Array(readFileSync(a)));
    const e = t.path('e.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k,extended_l2=on', e, '2M']);
    qemuIoIn(e, ['write -P 1 0 3k', 'write -z 20k 2k', 'write -P 4 1M 1k']);
    images.push(new Uint8Array(readFileSync(e)));
  });
  afterAll(() => t.cleanup());

  test.prop([fc.nat(1), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.boolean()), { minLength: 1, maxLength: 6 })], { numRuns: 300 })(
    'never anything but an ImgconvError',
    async (which, mutations) => {
      const b = images[which]!.slice();
      // Half the mutations land in the header cluster, the rest anywhere in the metadata-dense file.
      for (const [pos, v, head] of mutations) b[head ? pos % 256 : pos % b.length] = v;
      try {
        const img = await openBytes(b);
        await img.check();
        await img.hostSpace();
        await (await GuestReader.create([img])).sha256();
      } catch (e) {
        if (!(e instanceof ImgconvError)) throw e;
      }
    },
  );
});
