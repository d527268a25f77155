/**
 * Endian-aware field access for on-disk structures. 64-bit fields are read as bigint and converted
 * to a number only when they fit in 2^53: a hostile header must produce a FormatError that names the
 * field, never a silently rounded offset.
 */
import { FormatError } from './errors.js';

export const MAX_SAFE = Number.MAX_SAFE_INTEGER;

export function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** Converts a u64 to a number, failing with the field name when it is beyond 2^53. */
export function safeU64(v: bigint, format: string, field: string): number {
  if (v > BigInt(MAX_SAFE)) throw new FormatError(format, field, v, 'exceeds 2^53, beyond any supported file size');
  return Number(v);
}

export type Endian = 'le' | 'be';

/** A cursor-free reader over one structure, bound to a format name for error messages. */
export class FieldReader {
  readonly dv: DataView;
  readonly little: boolean;
  constructor(
    readonly buf: Uint8Array,
    readonly endian: Endian,
    readonly format: string,
  ) {
    this.dv = view(buf);
    this.little = endian === 'le';
  }
  u8(off: number): number {
    return this.dv.getUint8(off);
  }
  u16(off: number): number {
    return this.dv.getUint16(off, this.little);
  }
  u32(off: number): number {
    return this.dv.getUint32(off, this.little);
  }
  u64big(off: number): bigint {
    return this.dv.getBigUint64(off, this.little);
  }
  /** u64 that must fit in a JS number; `field` names it in the error. */
  u64(off: number, field: string): number {
    return safeU64(this.u64big(off), this.format, field);
  }
  bytes(off: number, len: number): Uint8Array {
    return this.buf.subarray(off, off + len);
  }
  ascii(off: number, len: number): string {
    return Buffer.from(this.buf.subarray(off, off + len)).toString('latin1');
  }
}

export class FieldWriter {
  readonly dv: DataView;
  readonly little: boolean;
  constructor(
    readonly buf: Uint8Array,
    readonly endian: Endian,
  ) {
    this.dv = view(buf);
    this.little = endian === 'le';
  }
  u8(off: number, v: number): void {
    this.dv.setUint8(off, v);
  }
  u16(off: number, v: number): void {
    this.dv.setUint16(off, v, this.little);
  }
  u32(off: number, v: number): void {
    this.dv.setUint32(off, v >>> 0, this.little);
  }
  u64(off: number, v: number | bigint): void {
    this.dv.setBigUint64(off, typeof v === 'bigint' ? v : BigInt(v), this.little);
  }
  bytes(off: number, src: Uint8Array): void {
    this.buf.set(src, off);
  }
  ascii(off: number, s: string): void {
    this.buf.set(Buffer.from(s, 'latin1'), off);
  }
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 31
    ? true
    : Number.isInteger(n) && n > 0 && Math.log2(n) % 1 === 0;
}

export function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

export function alignDown(n: number, a: number): number {
  return Math.floor(n / a) * a;
}

export function isAligned(n: number, a: number): boolean {
  return n % a === 0;
}

/** Checks that [offset, offset+length) is a well-formed range inside a file of `fileSize` bytes. */
export function requireInFile(
  format: string,
  field: string,
  offset: number,
  length: number,
  fileSize: number,
): void {
  if (offset + length > fileSize) {
    throw new FormatError(
      format,
      field,
      offset,
      `${length} bytes from there run past the end of the file (${fileSize} bytes)`,
    );
  }
}
