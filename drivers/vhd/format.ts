/**
 * VHD on-disk structures (all big-endian): the 512-byte footer, the 1024-byte dynamic disk header
 * with its 8 parent locators, checksums, and the text encodings of parent names and locators.
 * Decoding never throws for field values (the driver decides what is acceptable); encoding is for
 * tests today and the write half later.
 *
 * Sources: Microsoft "Virtual Hard Disk Image Format Specification" 1.0 (mirror: afeique/
 * vhd-image-format), libyal/libvhdi documentation, QEMU block/vpc.c, Xen blktap libvhd.
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import type { Geometry } from './geometry.js';

export const FORMAT = 'vhd';
export const FOOTER_SIZE = 512;
export const DYN_HEADER_SIZE = 1024;
export const FOOTER_COOKIE = 'conectix';
export const DYN_COOKIE = 'cxsparse';
export const VHD_VERSION = 0x00010000;
export const BAT_UNUSED = 0xffffffff;
/** Footer checksum field offset (also the dynamic header's is at 36). */
export const FOOTER_CHECKSUM_OFFSET = 64;
export const DYN_CHECKSUM_OFFSET = 36;
/** Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD timestamp base. */
export const VHD_EPOCH = 946684800;

export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;

export const FEATURE_TEMPORARY = 0x1;
export const FEATURE_RESERVED = 0x2;

export interface VhdFooter {
  cookie: string;
  features: number;
  version: number;
  /** Offset of the dynamic header; all ones in fixed disks (u64). */
  dataOffset: bigint;
  timestamp: number;
  /** Four bytes as latin1 ("vpc ", "qemu", "tap\0", ...). */
  creatorApp: string;
  creatorVersion: number;
  creatorOs: string;
  originalSize: bigint;
  currentSize: bigint;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uuid: Uint8Array;
  savedState: number;
}

export interface ParentLocator {
  /** Platform code as four latin1 characters ("W2ru", "W2ku", "MacX", ...) or "" for none. */
  code: string;
  codeValue: number;
  dataSpace: number;
  dataLength: number;
  reserved: number;
  dataOffset: bigint;
}

export interface DynHeader {
  cookie: string;
  dataOffset: bigint;
  tableOffset: bigint;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUuid: Uint8Array;
  parentTimestamp: number;
  reserved: number;
  /** UTF-16BE, NUL-terminated. */
  parentName: string;
  locators: ParentLocator[];
}

/** One's complement of the byte sum, with the 4-byte checksum field at `at` counted as zero. */
export function vhdChecksum(buf: Uint8Array, at: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= at && i < at + 4) continue;
    sum = (sum + buf[i]!) >>> 0;
  }
  return ~sum >>> 0;
}

export function hasCookie(buf: Uint8Array, cookie: string, at = 0): boolean {
  if (buf.length < at + cookie.length) return false;
  for (let i = 0; i < cookie.length; i++) if (buf[at + i] !== cookie.charCodeAt(i)) return false;
  return true;
}

/** Whether a footer (512 bytes, or the 511 of pre-2004 Virtual PC) has a correct checksum. */
export function footerChecksumOk(buf: Uint8Array): boolean {
  const stored = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(FOOTER_CHECKSUM_OFFSET, false);
  return vhdChecksum(buf, FOOTER_CHECKSUM_OFFSET) === stored;
}

export function decodeFooter(buf: Uint8Array): VhdFooter {
  const r = new FieldReader(buf, 'be', FORMAT);
  return {
    cookie: r.ascii(0, 8),
    features: r.u32(8),
    version: r.u32(12),
    dataOffset: r.u64big(16),
    timestamp: r.u32(24),
    creatorApp: r.ascii(28, 4),
    creatorVersion: r.u32(32),
    creatorOs: r.ascii(36, 4),
    originalSize: r.u64big(40),
    currentSize: r.u64big(48),
    geometry: { cylinders: r.u16(56), heads: r.u8(58), sectorsPerTrack: r.u8(59) },
    diskType: r.u32(60),
    checksum: r.u32(64),
    uuid: buf.slice(68, 84),
    savedState: r.u8(84),
  };
}

/** Encodes a footer; the checksum is computed unless `checksum` is given (to build bad ones). */
export function encodeFooter(f: Omit<VhdFooter, 'checksum' | 'cookie'> & { checksum?: number; cookie?: string }): Uint8Array {
  const buf = new Uint8Array(FOOTER_SIZE);
  const w = new FieldWriter(buf, 'be');
  w.ascii(0, f.cookie ?? FOOTER_COOKIE);
  w.u32(8, f.features);
  w.u32(12, f.version);
  w.u64(16, f.dataOffset);
  w.u32(24, f.timestamp);
  w.ascii(28, f.creatorApp);
  w.u32(32, f.creatorVersion);
  w.ascii(36, f.creatorOs);
  w.u64(40, f.originalSize);
  w.u64(48, f.currentSize);
  w.u16(56, f.geometry.cylinders);
  w.u8(58, f.geometry.heads);
  w.u8(59, f.geometry.sectorsPerTrack);
  w.u32(60, f.diskType);
  w.bytes(68, f.uuid.subarray(0, 16));
  w.u8(84, f.savedState);
  w.u32(FOOTER_CHECKSUM_OFFSET, f.checksum ?? vhdChecksum(buf, FOOTER_CHECKSUM_OFFSET));
  return buf;
}

const LOCATOR_BASE = 576;
const LOCATOR_SIZE = 24;
export const LOCATOR_COUNT = 8;

function fourcc(v: number): string {
  return v === 0 ? '' : String.fromCharCode((v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff);
}

export function fourccValue(code: string): number {
  if (code === '') return 0;
  return ((code.charCodeAt(0) << 24) | (code.charCodeAt(1) << 16) | (code.charCodeAt(2) << 8) | code.charCodeAt(3)) >>> 0;
}

export function decodeDynHeader(buf: Uint8Array): DynHeader {
  const r = new FieldReader(buf, 'be', FORMAT);
  const locators: ParentLocator[] = [];
  for (let i = 0; i < LOCATOR_COUNT; i++) {
    const at = LOCATOR_BASE + i * LOCATOR_SIZE;
    const codeValue = r.u32(at);
    locators.push({
      code: fourcc(codeValue),
      codeValue,
      dataSpace: r.u32(at + 4),
      dataLength: r.u32(at + 8),
      reserved: r.u32(at + 12),
      dataOffset: r.u64big(at + 16),
    });
  }
  return {
    cookie: r.ascii(0, 8),
    dataOffset: r.u64big(8),
    tableOffset: r.u64big(16),
    version: r.u32(24),
    maxTableEntries: r.u32(28),
    blockSize: r.u32(32),
    checksum: r.u32(36),
    parentUuid: buf.slice(40, 56),
    parentTimestamp: r.u32(56),
    reserved: r.u32(60),
    parentName: decodeUtf16(buf.subarray(64, 576), 'be').text,
    locators,
  };
}

export interface DynHeaderFields {
  dataOffset?: bigint;
  tableOffset: bigint | number;
  version?: number;
  maxTableEntries: number;
  blockSize: number;
  parentUuid?: Uint8Array;
  parentTimestamp?: number;
  parentName?: string;
  locators?: Array<{ code: string; dataSpace: number; dataLength: number; dataOffset: bigint | number }>;
  /** Stored as is instead of the computed checksum (to build bad ones). */
  checksum?: number;
}

export function encodeDynHeader(h: DynHeaderFields): Uint8Array {
  const buf = new Uint8Array(DYN_HEADER_SIZE);
  const w = new FieldWriter(buf, 'be');
  w.ascii(0, DYN_COOKIE);
  w.u64(8, h.dataOffset ?? 0xffffffffffffffffn);
  w.u64(16, h.tableOffset);
  w.u32(24, h.version ?? VHD_VERSION);
  w.u32(28, h.maxTableEntries);
  w.u32(32, h.blockSize);
  if (h.parentUuid) w.bytes(40, h.parentUuid.subarray(0, 16));
  w.u32(56, h.parentTimestamp ?? 0);
  if (h.parentName) w.bytes(64, encodeUtf16(h.parentName, 'be').subarray(0, 512));
  (h.locators ?? []).slice(0, LOCATOR_COUNT).forEach((l, i) => {
    const at = LOCATOR_BASE + i * LOCATOR_SIZE;
    w.u32(at, fourccValue(l.code));
    w.u32(at + 4, l.dataSpace);
    w.u32(at + 8, l.dataLength);
    w.u64(at + 16, l.dataOffset);
  });
  w.u32(DYN_CHECKSUM_OFFSET, h.checksum ?? vhdChecksum(buf, DYN_CHECKSUM_OFFSET));
  return buf;
}

/** Bitmap bytes before each block, as QEMU computes it: block/4096 rounded up to a sector (0 below 4 KiB). */
export function qemuBitmapSize(blockSize: number): number {
  return Math.ceil(Math.floor(blockSize / 4096) / 512) * 512;
}

/** Bitmap bytes before each block per the spec: one bit per sector, rounded up to a sector. */
export function specBitmapSize(blockSize: number): number {
  return Math.ceil(Math.ceil(blockSize / 512 / 8) / 512) * 512;
}

/** Sector `i` of a block is marked present in its bitmap (most significant bit first, as blktap). */
export function bitmapTest(bitmap: Uint8Array, i: number): boolean {
  return ((bitmap[i >> 3]! << (i & 7)) & 0x80) !== 0;
}

export function bitmapSet(bitmap: Uint8Array, i: number): void {
  bitmap[i >> 3] = bitmap[i >> 3]! | (0x80 >> (i & 7));
}

export type Utf16Order = 'le' | 'be';

/**
 * Decodes UTF-16 text of a known or guessed byte order. A byte order mark wins; without one the
 * order is `order`, or when `order` is undefined the one whose high bytes are zero more often (ASCII
 * paths are then unambiguous; ties go to little-endian, Windows' order). Text ends at the first NUL
 * code unit. `valid` is false for an odd length or unpaired surrogates (replaced by U+FFFD).
 */
export function decodeUtf16(bytes: Uint8Array, order?: Utf16Order): { text: string; order: Utf16Order; valid: boolean } {
  let start = 0;
  let ord = order;
  if (bytes.length >= 2 && bytes[0] === 0xff && bytes[1] === 0xfe) {
    ord = 'le';
    start = 2;
  } else if (bytes.length >= 2 && bytes[0] === 0xfe && bytes[1] === 0xff) {
    ord = 'be';
    start = 2;
  }
  if (!ord) {
    let evenZero = 0;
    let oddZero = 0;
    for (let i = start; i + 1 < bytes.length; i += 2) {
      if (bytes[i] === 0 && bytes[i + 1] === 0) break;
      if (bytes[i] === 0) evenZero++;
      if (bytes[i + 1] === 0) oddZero++;
    }
    ord = evenZero > oddZero ? 'be' : 'le';
  }
  let valid = (bytes.length - start) % 2 === 0;
  const units: number[] = [];
  for (let i = start; i + 1 < bytes.length; i += 2) {
    const u = ord === 'le' ? bytes[i]! | (bytes[i + 1]! << 8) : (bytes[i]! << 8) | bytes[i + 1]!;
    if (u === 0) break;
    units.push(u);
  }
  let text = '';
  for (let i = 0; i < units.length; i++) {
    const u = units[i]!;
    if (u >= 0xd800 && u <= 0xdbff && i + 1 < units.length && units[i + 1]! >= 0xdc00 && units[i + 1]! <= 0xdfff) {
      text += String.fromCharCode(u, units[++i]!);
    } else if (u >= 0xd800 && u <= 0xdfff) {
      valid = false;
      text += '\ufffd';
    } else {
      text += String.fromCharCode(u);
    }
  }
  return { text, order: ord, valid };
}

/** UTF-16 without a byte order mark or terminator. */
export function encodeUtf16(text: string, order: Utf16Order): Uint8Array {
  const out = new Uint8Array(text.length * 2);
  for (let i = 0; i < text.length; i++) {
    const u = text.charCodeAt(i);
    out[2 * i + (order === 'le' ? 0 : 1)] = u & 0xff;
    out[2 * i + (order === 'le' ? 1 : 0)] = u >>> 8;
  }
  return out;
}

/** Formats 16 bytes as a UUID (the bytes in stored order, as libvhdi's "big-endian GUID"). */
export function formatUuid(b: Uint8Array): string {
  const h = Buffer.from(b).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

/** A four-byte code for messages: printable ASCII as is, anything else as \xNN. */
export function printable(s: string): string {
  let out = '';
  for (const c of s) {
    const v = c.charCodeAt(0);
    out += v >= 0x20 && v < 0x7f ? c : `\\x${v.toString(16).padStart(2, '0')}`;
  }
  return out;
}

export function vhdTimestampIso(t: number): string {
  return new Date((VHD_EPOCH + t) * 1000).toISOString().replace('.000Z', 'Z');
}
