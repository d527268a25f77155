/**
 * VMDK on-disk structures: round trips (fast-check), descriptor parsing rules, probing.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { decodeDescriptor, encodeDescriptor, type Descriptor, type DescriptorExtent } from '../../drivers/vmdk/descriptor.js';
import { decodeSparseHeader, encodeSparseHeader, validateSparseHeader, VMDK4_MAGIC, type SparseExtentHeader } from '../../drivers/vmdk/header.js';
import { decodeGrainMarker, decodeMetadataMarker, encodeGrainMarker, encodeMetadataMarker, isMetadataMarker, MARKER_GT } from '../../drivers/vmdk/markers.js';
import { probeVmdk } from '../../drivers/vmdk/index.js';
import { FormatError } from '../../src/errors.js';
import { buildSparse } from './vmdk-build.js';

const u64 = fc.bigInt({ min: 0n, max: 0xffffffffffffffffn });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u8 = fc.integer({ min: 0, max: 255 });

const headerArb: fc.Arbitrary<SparseExtentHeader> = fc.record({
  magic: u32,
  version: u32,
  flags: u32,
  capacity: u64,
  grainSize: u64,
  descriptorOffset: u64,
  descriptorSize: u64,
  numGTEsPerGT: u32,
  rgdOffset: u64,
  gdOffset: u64,
  overHead: u64,
  uncleanShutdown: u8,
  singleEndLineChar: u8,
  nonEndLineChar: u8,
  doubleEndLineChar1: u8,
  doubleEndLineChar2: u8,
  compressAlgorithm: fc.integer({ min: 0, max: 0xffff }),
});

describe('SparseExtentHeader', () => {
  test.prop([headerArb])('decode(encode(h)) = h', (h) => {
    const bytes = encodeSparseHeader(h);
    expect(bytes.length).toBe(512);
    expect(decodeSparseHeader(bytes)).toEqual(h);
  });
  test.prop([fc.uint8Array({ minLength: 512, maxLength: 512 })])('encode(decode(b)) keeps the 79 field bytes', (b) => {
    const again = encodeSparseHeader(decodeSparseHeader(b));
    expect(again.subarray(0, 79)).toEqual(b.subarray(0, 79));
    expect(again.subarray(79).every((x) => x === 0)).toBe(true);
  });
  it('reads the fields of a QEMU-layout header', () => {
    const b = buildSparse({ capacitySectors: 2048, grains: new Map() });
    const h = decodeSparseHeader(b.bytes.subarray(0, 512));
    expect(h.magic).toBe(VMDK4_MAGIC);
    expect(Buffer.from(b.bytes.subarray(0, 4)).toString('latin1')).toBe('KDMV');
    const g = validateSparseHeader(h, b.bytes.length);
    expect(g.virtualSize).toBe(2048 * 512);
    expect(g.grainBytes).toBe(4096);
    expect(g.gdEntries).toBe(1);
  });
});

describe('markers', () => {
  test.prop([fc.record({ lba: u64, size: u32 })])('grain marker round trip', (m) => {
    const b = encodeGrainMarker(m);
    expect(b.length).toBe(12);
    expect(decodeGrainMarker(b)).toEqual(m);
  });
  test.prop([fc.record({ numSectors: u64, size: u32, type: u32 })])('metadata marker round trip', (m) => {
    const b = encodeMetadataMarker(m);
    expect(b.length).toBe(512);
    expect(decodeMetadataMarker(b)).toEqual(m);
  });
  it('recognises a metadata marker only with size 0, its type and zero padding', () => {
    const m = encodeMetadataMarker({ numSectors: 4n, size: 0, type: MARKER_GT });
    expect(isMetadataMarker(m, MARKER_GT)).toBe(true);
    expect(isMetadataMarker(m, 2)).toBe(false);
    m[100] = 1;
    expect(isMetadataMarker(m, MARKER_GT)).toBe(false);
  });
});

// Strings a descriptor can carry: no quotes, newlines or control characters, no surrounding blanks.
const safeText = fc
  .string({ unit: fc.constantFrom(...'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./ ()é'.split('')), minLength: 1, maxLength: 24 })
  .map((s) => s.trim())
  .filter((s) => s.length > 0);
const keyTail = fc.string({ unit: fc.constantFrom(...'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.'.split('')), minLength: 1, maxLength: 16 });
const extentArb: fc.Arbitrary<DescriptorExtent> = fc
  .record({
    access: fc.constantFrom('RW' as const, 'RDONLY' as const, 'NOACCESS' as const),
    sectors: fc.integer({ min: 0, max: 2 ** 40 }),
    type: fc.constantFrom('FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'SESPARSE'),
    file: fc.option(safeText, { nil: undefined }),
    offset: fc.option(fc.integer({ min: 0, max: 2 ** 40 }), { nil: undefined }),
  })
  .map((e) => {
    const out: DescriptorExtent = { access: e.access, sectors: e.sectors, type: e.type };
    if (e.file !== undefined) {
      out.file = e.file;
      if (e.offset !== undefined) out.offset = e.offset;
    }
    return out;
  });
const descriptorArb: fc.Arbitrary<Descriptor> = fc
  .record({
    version: fc.integer({ min: 1, max: 3 }),
    cid: u32,
    parentCid: u32,
    createType: fc.option(fc.constantFrom('monolithicSparse', 'monolithicFlat', 'streamOptimized', 'twoGbMaxExtentSparse', 'vmfs'), { nil: undefined }),
    parentFileNameHint: fc.option(safeText, { nil: undefined }),
    extents: fc.array(extentArb, { maxLength: 4 }),
    ddb: fc.array(fc.tuple(keyTail.map((k) => `ddb.${k}`), fc.oneof(safeText, fc.constant(''))), { maxLength: 6 }),
    other: fc.array(
      fc.tuple(
        keyTail.filter((k) => /^[A-Za-z]/.test(k) && !['version', 'CID', 'parentCID', 'createType', 'parentFileNameHint'].includes(k) && !k.startsWith('ddb.')),
        safeText.map((s) => `"${s}"`),
      ),
      { maxLength: 3 },
    ),
  })
  .map((r) => {
    const d: Descriptor = { version: r.version, cid: r.cid, parentCid: r.parentCid, extents: r.extents, ddb: r.ddb, other: r.other };
    if (r.createType !== undefined) d.createType = r.createType;
    if (r.parentFileNameHint !== undefined) d.parentFileNameHint = r.parentFileNameHint;
    return d;
  });

describe('descriptor', () => {
  test.prop([descriptorArb])('decode(encode(d)) = d', (d) => {
    expect(decodeDescriptor(encodeDescriptor(d), { requireCreateType: false })).toEqual(d);
  });

  it('parses what qemu-img writes, CRLF and NUL padding included', () => {
    const text = [
      '# Disk DescriptorFile',
      'version=1',
      'CID=7c0ddac',
      'parentCID=562974f4',
      'createType="monolithicSparse"',
      'parentFileNameHint="p.vmdk"',
      '# Extent description',
      'RW 32768 SPARSE "c.vmdk"',
      'RW 20480 FLAT "f-flat.vmdk" 0',
      '# The Disk Data Base',
      '#DDB',
      'ddb.virtualHWVersion = "4"',
      'ddb.adapterType = "ide"',
      '',
    ].join('\r\n');
    const bytes = new Uint8Array(2048);
    bytes.set(Buffer.from(text));
    const d = decodeDescriptor(bytes);
    expect(d.cid).toBe(0x7c0ddac);
    expect(d.parentCid).toBe(0x562974f4);
    expect(d.createType).toBe('monolithicSparse');
    expect(d.parentFileNameHint).toBe('p.vmdk');
    expect(d.extents).toEqual([
      { access: 'RW', sectors: 32768, type: 'SPARSE', file: 'c.vmdk' },
      { access: 'RW', sectors: 20480, type: 'FLAT', file: 'f-flat.vmdk', offset: 0 },
    ]);
    expect(d.ddb).toEqual([
      ['ddb.virtualHWVersion', '4'],
      ['ddb.adapterType', 'ide'],
    ]);
  });

  const base = 'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n';
  const cases: [string, string, string][] = [
    ['a line that is nothing', base + 'RW 10 FLAT "x" 0\nwhat is this\n', 'descriptor line 6'],
    ['unbalanced quotes', base + 'ddb.adapterType = "ide\n', 'descriptor line 5'],
    ['control characters', base + 'ddb.x = "a\u0001b"\n', 'descriptor line 5'],
    ['CID not hex', 'version=1\nCID=xyz\nparentCID=ffffffff\ncreateType="monolithicFlat"\n', 'descriptor line 2'],
    ['CID over 32 bits', 'version=1\nCID=123456789\nparentCID=ffffffff\ncreateType="monolithicFlat"\n', 'descriptor line 2'],
    ['version not a number', 'version=one\nCID=1\nparentCID=ffffffff\ncreateType="x"\n', 'descriptor line 1'],
    ['extent size beyond 2^53 bytes', base + 'RW 99999999999999999 FLAT "x" 0\n', 'descriptor line 5'],
    ['missing CID', 'version=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n', 'descriptor CID'],
    ['missing parentCID', 'version=1\nCID=1\ncreateType="monolithicFlat"\n', 'descriptor parentCID'],
    ['missing version', 'CID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n', 'descriptor version'],
    ['missing createType', 'version=1\nCID=1\nparentCID=ffffffff\n', 'descriptor createType'],
  ];
  for (const [name, text, field] of cases) {
    it(`rejects ${name} naming ${field}`, () => {
      let err: unknown;
      try {
        decodeDescriptor(text);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(FormatError);
      expect((err as FormatError).field).toBe(field);
    });
  }
  it('refuses a descriptor over 1 MiB before parsing it', () => {
    expect(() => decodeDescriptor(new Uint8Array((1 << 20) + 1).fill(0x23))).toThrow(FormatError);
  });
});

describe('probe', () => {
  const input = (head: Uint8Array, size = head.length) => ({ head, tail: head.subarray(Math.max(0, head.length - 512)), size, path: 'x' });
  it('scores a sparse header 100', () => {
    expect(probeVmdk(input(buildSparse({ capacitySectors: 64, grains: new Map() }).bytes))).toBe(100);
  });
  it('scores a GD_AT_END stream 100', () => {
    expect(probeVmdk(input(buildSparse({ capacitySectors: 64, stream: true, gdAtEnd: true, grains: new Map() }).bytes))).toBe(100);
  });
  it('scores a descriptor file 100', () => {
    const text = encodeDescriptor({ version: 1, cid: 1, parentCid: 0xffffffff, createType: 'monolithicFlat', extents: [{ access: 'RW', sectors: 8, type: 'FLAT', file: 'a', offset: 0 }], ddb: [], other: [] });
    expect(probeVmdk(input(Buffer.from(text)))).toBe(100);
    // Without the comment line, createType= is enough.
    expect(probeVmdk(input(Buffer.from(text.replace('# Disk DescriptorFile\n', ''))))).toBe(100);
  });
  it('does not take a raw disk that merely starts with KDMV or with text', () => {
    const b = buildSparse({ capacitySectors: 64, grains: new Map() }).bytes.slice(0, 4096);
    const h = decodeSparseHeader(b);
    for (const bad of [{ version: 4 }, { version: 0 }, { grainSize: 3n }, { grainSize: 0n }, { numGTEsPerGT: 0 }, { numGTEsPerGT: 513 }]) {
      const x = b.slice();
      x.set(encodeSparseHeader({ ...h, ...bad }));
      expect(probeVmdk(input(x))).toBe(0);
    }
    expect(probeVmdk(input(Buffer.from('KDMV')))).toBe(0);
    expect(probeVmdk(input(new Uint8Array(65536)))).toBe(0);
    expect(probeVmdk(input(Buffer.from('# Disk DescriptorFile\nthis is not one\n')))).toBe(0);
    expect(probeVmdk(input(Buffer.from('createType="monolithicFlat"\n\u0000\u0001binary')))).toBe(0);
    const text = Buffer.from('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n');
    expect(probeVmdk(input(text, 10 << 20))).toBe(0); // a 10 MiB "descriptor" is a disk
  });
});
