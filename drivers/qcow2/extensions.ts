/**
 * Header extensions (qcow2.rst "Header extensions"): (u32 type, u32 length, data padded to 8) from
 * header_length up to the backing name (or the end of cluster 0). The walk is bounded by that area,
 * as in QEMU's qcow2_read_extensions; unknown types are kept, type 0 ends the list.
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import { FormatError } from '../../src/errors.js';
import { FORMAT } from './header.js';

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

/** Walks the extension area [start, end) of `cluster0`. */
export function decodeExtensions(cluster0: Uint8Array, start: number, end: number): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  const r = new FieldReader(cluster0, 'be', FORMAT);
  let pos = start;
  while (pos < end) {
    if (pos + 8 > end || pos + 8 > cluster0.length) {
      throw new FormatError(FORMAT, 'header extension', pos, `extension header runs past the extension area end ${end}`);
    }
    const type = r.u32(pos);
    const len = r.u32(pos + 4);
    pos += 8;
    if (len > end - pos) throw new FormatError(FORMAT, 'header extension length', len, `extension 0x${type.toString(16)} at ${pos - 8} runs past the extension area end ${end}`);
    if (type === EXT_END) break;
    out.push({ type, data: cluster0.slice(pos, pos + len) });
    pos += Math.ceil(len / 8) * 8;
  }
  return out;
}

/** The extension area bytes, ending with the end marker. */
export function encodeExtensions(exts: HeaderExtension[]): Uint8Array {
  const size = exts.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0) + 8;
  const buf = new Uint8Array(size);
  const w = new FieldWriter(buf, 'be');
  let pos = 0;
  for (const e of exts) {
    w.u32(pos, e.type);
    w.u32(pos + 4, e.data.length);
    w.bytes(pos + 8, e.data);
    pos += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  return buf;
}

/** Feature-name table: 48-byte entries (u8 type 0/1/2 = incompatible/compatible/autoclear, u8 bit, 46-byte name). */
export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

export function decodeFeatureTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let pos = 0; pos + 48 <= data.length; pos += 48) {
    const raw = data.subarray(pos + 2, pos + 48);
    const nul = raw.indexOf(0);
    out.push({ type: data[pos]!, bit: data[pos + 1]!, name: Buffer.from(nul < 0 ? raw : raw.subarray(0, nul)).toString('latin1') });
  }
  return out;
}

export function encodeFeatureTable(names: FeatureName[]): Uint8Array {
  const buf = new Uint8Array(names.length * 48);
  names.forEach((f, i) => {
    buf[i * 48] = f.type;
    buf[i * 48 + 1] = f.bit;
    buf.set(Buffer.from(f.name.slice(0, 46), 'latin1'), i * 48 + 2);
  });
  return buf;
}

/** Bitmaps extension: u32 nb_bitmaps, u32 reserved (0), u64 directory size, u64 directory offset. */
export interface BitmapsExtension {
  nbBitmaps: number;
  reserved: number;
  directorySize: number;
  directoryOffset: number;
}

export const BITMAPS_EXT_BYTES = 24;

export function decodeBitmapsExtension(data: Uint8Array): BitmapsExtension {
  if (data.length !== BITMAPS_EXT_BYTES) throw new FormatError(FORMAT, 'bitmaps extension length', data.length, `must be ${BITMAPS_EXT_BYTES}`);
  const r = new FieldReader(data, 'be', FORMAT);
  return {
    nbBitmaps: r.u32(0),
    reserved: r.u32(4),
    directorySize: r.u64(8, 'bitmap_directory_size'),
    directoryOffset: r.u64(16, 'bitmap_directory_offset'),
  };
}

export function encodeBitmapsExtension(e: BitmapsExtension): Uint8Array {
  const buf = new Uint8Array(BITMAPS_EXT_BYTES);
  const w = new FieldWriter(buf, 'be');
  w.u32(0, e.nbBitmaps);
  w.u32(4, e.reserved);
  w.u64(8, e.directorySize);
  w.u64(16, e.directoryOffset);
  return buf;
}

/** Full disk encryption header pointer: u64 offset, u64 length of the LUKS header in the file. */
export interface CryptoExtension {
  offset: number;
  length: number;
}

export const CRYPTO_EXT_BYTES = 16;

export function decodeCryptoExtension(data: Uint8Array): CryptoExtension {
  if (data.length !== CRYPTO_EXT_BYTES) throw new FormatError(FORMAT, 'crypto extension length', data.length, `must be ${CRYPTO_EXT_BYTES}`);
  const r = new FieldReader(data, 'be', FORMAT);
  return { offset: r.u64(0, 'crypto header offset'), length: r.u64(8, 'crypto header length') };
}

export function encodeCryptoExtension(e: CryptoExtension): Uint8Array {
  const buf = new Uint8Array(CRYPTO_EXT_BYTES);
  const w = new FieldWriter(buf, 'be');
  w.u64(0, e.offset);
  w.u64(8, e.length);
  return buf;
}

/** Strings in extensions are not NUL-terminated; QEMU reads them up to the first NUL anyway. */
export function extensionString(data: Uint8Array): string {
  const nul = data.indexOf(0);
  return Buffer.from(nul < 0 ? data : data.subarray(0, nul)).toString('utf8');
}
