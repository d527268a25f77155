/**
 * VHD structures: footer and dynamic header round trips, checksums, UTF-16 text, the bitmap's bit
 * order, and the CHS geometry against QEMU's sizing rules (property tests).
 */
import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import {
  CHS_MAX_C,
  CHS_MAX_H,
  CHS_MAX_S,
  VHD_MAX_GEOMETRY,
  bitmapSet,
  bitmapTest,
  decodeDynHeader,
  decodeFooter,
  decodeUtf16,
  encodeDynHeader,
  encodeFooter,
  encodeUtf16,
  footerChecksumOk,
  geometryForSectors,
  geometrySectors,
  qemuBitmapSize,
  qemuCreateSize,
  specBitmapSize,
  vhdChecksum,
  virtualSectors,
  vhdDriver,
} from '../../drivers/vhd/index.js';
import { locatorSpaceBytes, macxPath, windowsPathToPosix } from '../../drivers/vhd/parent.js';
import { buildDynamic, footer } from './vhd-support.js';

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const fourcc = fc.string({ unit: fc.integer({ min: 0, max: 255 }).map((c) => String.fromCharCode(c)), minLength: 4, maxLength: 4 });
const uuid = fc.uint8Array({ minLength: 16, maxLength: 16 });

const footerArb = fc.record({
  features: u32,
  version: u32,
  dataOffset: u64,
  timestamp: u32,
  creatorApp: fourcc,
  creatorVersion: u32,
  creatorOs: fourcc,
  originalSize: u64,
  currentSize: u64,
  geometry: fc.record({ cylinders: fc.integer({ min: 0, max: 0xffff }), heads: fc.integer({ min: 0, max: 255 }), sectorsPerTrack: fc.integer({ min: 0, max: 255 }) }),
  diskType: u32,
  uuid,
  savedState: fc.integer({ min: 0, max: 255 }),
});

describe('footer', () => {
  test.prop([footerArb])('decode(encode(f)) = f, with a valid checksum', (f) => {
    const buf = encodeFooter(f);
    expect(buf.length).toBe(512);
    expect(footerChecksumOk(buf)).toBe(true);
    const d = decodeFooter(buf);
    expect({ ...d, uuid: [...d.uuid] }).toEqual({ ...f, uuid: [...f.uuid], cookie: 'conectix', checksum: vhdChecksum(buf, 64) });
    expect(encodeFooter(d)).toEqual(buf);
  });

  test.prop([footerArb, fc.integer({ min: 0, max: 511 }), fc.integer({ min: 1, max: 255 })])('any changed byte outside the checksum breaks it', (f, at, delta) => {
    const buf = encodeFooter(f);
    fc.pre(at < 64 || at >= 68);
    buf[at] = (buf[at]! + delta) & 0xff;
    expect(footerChecksumOk(buf)).toBe(false);
  });

  it('checksum is the one’s complement of the byte sum without the field (QEMU-made footer)', () => {
    const buf = footer({ diskType: 3, currentSize: 1 << 20 });
    let sum = 0;
    buf.forEach((b, i) => {
      if (i < 64 || i >= 68) sum += b;
    });
    expect(new DataView(buf.buffer).getUint32(64)).toBe(~sum >>> 0);
  });
});

const locatorArb = fc.record({
  code: fc.constantFrom('W2ru', 'W2ku', 'MacX', 'Wi2r', 'Wi2k', 'Mac '),
  dataSpace: u32,
  dataLength: u32,
  dataOffset: u64,
});

describe('dynamic header', () => {
  test.prop([
    fc.record({
      dataOffset: u64,
      tableOffset: u64,
      version: u32,
      maxTableEntries: u32,
      blockSize: u32,
      parentUuid: uuid,
      parentTimestamp: u32,
      parentName: fc.string({ maxLength: 255, unit: fc.integer({ min: 1, max: 0xd7ff }).map((c) => String.fromCharCode(c)) }),
      locators: fc.array(locatorArb, { maxLength: 8 }),
    }),
  ])('decode(encode(h)) = h, with a valid checksum', (h) => {
    const buf = encodeDynHeader(h);
    expect(buf.length).toBe(1024);
    const d = decodeDynHeader(buf);
    expect(d.cookie).toBe('cxsparse');
    expect(d.checksum).toBe(vhdChecksum(buf, 36));
    expect([d.dataOffset, d.tableOffset, d.version, d.maxTableEntries, d.blockSize, d.parentTimestamp, d.parentName]).toEqual([
      h.dataOffset, h.tableOffset, h.version, h.maxTableEntries, h.blockSize, h.parentTimestamp, h.parentName,
    ]);
    expect([...d.parentUuid]).toEqual([...h.parentUuid]);
    expect(d.locators.slice(0, h.locators.length).map((l) => ({ code: l.code, dataSpace: l.dataSpace, dataLength: l.dataLength, dataOffset: l.dataOffset }))).toEqual(h.locators);
    expect(d.locators.slice(h.locators.length).every((l) => l.codeValue === 0)).toBe(true);
    expect(encodeDynHeader({ ...d, locators: h.locators })).toEqual(buf);
  });
});

describe('UTF-16 text', () => {
  const text = fc.string({ unit: 'binary', maxLength: 100 }).filter((s) => !s.includes('\0'));
  test.prop([text, fc.constantFrom('le' as const, 'be' as const)])('round trip in a stated byte order (surrogate pairs included)', (s, order) => {
    const d = decodeUtf16(encodeUtf16(s, order), order);
    expect(d).toEqual({ text: s, order, valid: true });
  });

  test.prop([fc.stringMatching(/^[ -~]{1,80}$/), fc.constantFrom('le' as const, 'be' as const)])('ASCII paths: the byte order is recognised without a BOM', (s, order) => {
    expect(decodeUtf16(encodeUtf16(s, order))).toEqual({ text: s, order, valid: true });
  });

  it('honours a byte order mark, stops at NUL, flags odd lengths and lone surrogates', () => {
    expect(decodeUtf16(Uint8Array.from([0xfe, 0xff, 0, 0x41, 0, 0x42]))).toEqual({ text: 'AB', order: 'be', valid: true });
    expect(decodeUtf16(Uint8Array.from([0xff, 0xfe, 0x41, 0, 0x42, 0]), 'be')).toEqual({ text: 'AB', order: 'le', valid: true });
    expect(decodeUtf16(Uint8Array.from([0x41, 0, 0, 0, 0x42, 0]), 'le').text).toBe('A');
    expect(decodeUtf16(Uint8Array.from([0x41, 0, 0x42]), 'le').valid).toBe(false);
    expect(decodeUtf16(encodeUtf16('a\ud800b', 'le'), 'le')).toEqual({ text: 'a\ufffdb', order: 'le', valid: false });
    expect(decodeUtf16(encodeUtf16('C:\\Données\\日本.vhd', 'le')).text).toBe('C:\\Données\\日本.vhd');
    expect(decodeUtf16(encodeUtf16('C:\\Données\\日本.vhd', 'be')).text).toBe('C:\\Données\\日本.vhd');
  });

  it('turns Windows paths and file URLs into POSIX paths', () => {
    expect(windowsPathToPosix('.\\dir\\p.vhd')).toBe('./dir/p.vhd');
    expect(macxPath('file:///a/b%20c.vhd')).toEqual({ path: '/a/b c.vhd' });
    expect(macxPath('file://localhost/a.vhd')).toEqual({ path: '/a.vhd' });
    expect(macxPath('http://x/a.vhd').error).toMatch(/not a file:\/\/ URL/);
    expect(locatorSpaceBytes(1)).toBe(512);
    expect(locatorSpaceBytes(512)).toBe(512);
    expect(locatorSpaceBytes(1024)).toBe(1024);
    expect(locatorSpaceBytes(1000)).toBeUndefined();
  });
});

describe('block bitmap', () => {
  it('sector 0 is the most significant bit of byte 0 (blktap, Windows)', () => {
    const b = new Uint8Array(2);
    bitmapSet(b, 0);
    bitmapSet(b, 9);
    expect([...b]).toEqual([0x80, 0x40]);
    expect(bitmapTest(b, 0) && bitmapTest(b, 9) && !bitmapTest(b, 1) && !bitmapTest(b, 8)).toBe(true);
  });

  test.prop([fc.integer({ min: 12, max: 31 })])('QEMU and the spec agree on the bitmap size from 4 KiB blocks up', (shift) => {
    expect(qemuBitmapSize(2 ** shift)).toBe(specBitmapSize(2 ** shift));
  });

  it('below 4 KiB QEMU has no bitmap and the spec one sector (why imgconv refuses such block sizes)', () => {
    for (const bs of [512, 1024, 2048]) expect([qemuBitmapSize(bs), specBitmapSize(bs)]).toEqual([0, 512]);
    expect(qemuBitmapSize(2 * 1024 * 1024)).toBe(512);
  });
});

describe('geometry', () => {
  const sectors = fc.integer({ min: 0, max: VHD_MAX_GEOMETRY + 1000 });

  test.prop([sectors])('the spec calculation rounds down, within the CHS limits', (n) => {
    const g = geometryForSectors(n);
    expect(geometrySectors(g)).toBeLessThanOrEqual(Math.min(n, VHD_MAX_GEOMETRY));
    expect(g.cylinders).toBeLessThanOrEqual(CHS_MAX_C);
    expect(g.heads).toBeLessThanOrEqual(CHS_MAX_H);
    expect([17, 31, 63, 255]).toContain(g.sectorsPerTrack);
  });

  test.prop([fc.integer({ min: 1, max: 2040 * 1024 * 2048 }).map((s) => s * 512), fc.boolean()])(
    'qemu-img create sizes round-trip through open: the footer QEMU writes reads back as the size it reports',
    (size, force) => {
      const c = qemuCreateSize(size, force);
      expect(c.virtualSize).toBeGreaterThanOrEqual(size);
      if (force || size > VHD_MAX_GEOMETRY * 512) expect(c.virtualSize).toBe(size);
      // open computes the same size from the footer QEMU writes (current_size = the created size)
      expect(Number(virtualSectors(c.creatorApp, c.geometry, BigInt(c.virtualSize))) * 512).toBe(c.virtualSize);
      // and a CHS-sized disk is a fixed point of the spec calculation
      if (c.creatorApp === 'qemu' && geometrySectors(c.geometry) !== VHD_MAX_GEOMETRY) {
        expect(geometryForSectors(c.virtualSize / 512)).toEqual(c.geometry);
      }
    },
  );

  test.prop([fc.integer({ min: 1, max: VHD_MAX_GEOMETRY })])('the created size is the smallest CHS size covering the request', (n) => {
    const c = qemuCreateSize(n * 512);
    const below = c.virtualSize / 512 - 1;
    if (below >= n && geometrySectors(c.geometry) !== VHD_MAX_GEOMETRY) {
      expect(geometrySectors(geometryForSectors(below))).toBeLessThan(n);
    }
  });

  it('uses current_size for the creators QEMU trusts and for the maximum geometry', () => {
    const g = geometryForSectors(1000);
    for (const app of ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0']) expect(virtualSectors(app, g, 4096n * 512n + 100n)).toBe(4096n);
    for (const app of ['vpc ', 'qemu', 'vs  ', 'd2v\0', 'tap ']) expect(virtualSectors(app, g, 4096n * 512n)).toBe(BigInt(geometrySectors(g)));
    expect(virtualSectors('vpc ', { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S }, 1n << 40n)).toBe((1n << 40n) / 512n);
  });
});

describe('probe', () => {
  const dyn = buildDynamic({ virtualSize: 4 << 20 }).bytes;
  const input = (b: Uint8Array) => ({ head: b.subarray(0, 65536), tail: b.subarray(Math.max(0, b.length - 512)), size: b.length, path: 'x' });
  it('scores a footer copy at 0 and a footer at the end 100; a bad copy at 0 still beats raw; anything else 0', () => {
    expect(vhdDriver.probe(input(dyn))).toBe(100);
    const fixed = new Uint8Array(4096 + 512);
    fixed.set(footer({ diskType: 2, currentSize: 4096 }), 4096);
    expect(vhdDriver.probe(input(fixed))).toBe(100);
    const bad = dyn.slice();
    bad[100] = 1;
    expect(vhdDriver.probe(input(bad))).toBe(50);
    const badTail = fixed.slice();
    badTail[4096 + 100] = 1;
    expect(vhdDriver.probe(input(badTail))).toBe(0);
    expect(vhdDriver.probe(input(new Uint8Array(1024)))).toBe(0);
    expect(vhdDriver.probe(input(new Uint8Array(0)))).toBe(0);
    // a 511-byte footer is claimed, so that open can refuse it by name
    const old = new Uint8Array(4096 + 511);
    old.set(footer({ diskType: 2, currentSize: 4096 }).subarray(0, 511), 4096);
    expect(vhdDriver.probe(input(old))).toBe(100);
  });
});
