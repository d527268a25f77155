/**
 * A one-member POSIX tar stream around a streamed image (`--tar NAME`): the member's header carries
 * the measured size, then the image, zero padding to a 512-byte block, and the two zero blocks that
 * end an archive. Sizes beyond the 11 octal digits of the ustar size field (8 GiB, common for disks)
 * and names beyond its 100 bytes go into a pax extended header ('x'), which POSIX tar, GNU tar and
 * bsdtar read; the ustar size field then holds the size in base-256 (GNU and bsdtar read that too).
 */
import { FormatError, UsageError } from '../errors.js';

export const TAR_BLOCK = 512;
/** The largest size the ustar field holds in octal: 11 digits. */
const MAX_OCTAL_SIZE = 0o77777777777;
const NAME_FIELD = 100;

function putString(buf: Uint8Array, at: number, length: number, s: string): void {
  const b = Buffer.from(s, 'utf8');
  buf.set(b.subarray(0, length), at);
}

/** `value` as zero-padded octal digits filling `length - 1` bytes, then NUL. */
function putOctal(buf: Uint8Array, at: number, length: number, value: number): void {
  putString(buf, at, length - 1, value.toString(8).padStart(length - 1, '0'));
  buf[at + length - 1] = 0;
}

/** GNU base-256: high bit of the first byte set, the value big-endian in the rest. */
function putBase256(buf: Uint8Array, at: number, length: number, value: number): void {
  let v = BigInt(value);
  for (let i = length - 1; i > 0; i--) {
    buf[at + i] = Number(v & 0xffn);
    v >>= 8n;
  }
  buf[at] = 0x80;
}

/** One 512-byte ustar header with its checksum. */
function ustarHeader(name: string, size: number, mtime: number, typeflag: string): Uint8Array {
  const h = new Uint8Array(TAR_BLOCK);
  putString(h, 0, NAME_FIELD, name);
  putOctal(h, 100, 8, 0o644);
  putOctal(h, 108, 8, 0);
  putOctal(h, 116, 8, 0);
  if (size <= MAX_OCTAL_SIZE) putOctal(h, 124, 12, size);
  else putBase256(h, 124, 12, size);
  putOctal(h, 136, 12, Math.max(0, Math.min(Math.floor(mtime), MAX_OCTAL_SIZE)));
  h[156] = typeflag.charCodeAt(0);
  putString(h, 257, 6, 'ustar\0');
  putString(h, 263, 2, '00');
  // The checksum is summed with its own field read as eight spaces.
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  putString(h, 148, 6, sum.toString(8).padStart(6, '0'));
  h[154] = 0;
  h[155] = 0x20;
  return h;
}

/** A pax record "LEN key=value\n", where LEN counts the whole record including its own digits. */
function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  const bodyBytes = Buffer.byteLength(body, 'utf8');
  let len = bodyBytes + 1;
  while (String(len).length + bodyBytes !== len) len = String(len).length + bodyBytes;
  return `${len}${body}`;
}

function padToBlock(n: number): number {
  return (TAR_BLOCK - (n % TAR_BLOCK)) % TAR_BLOCK;
}

/** Refuses names that would not extract as one file beside the others (OVA members sit at the root). */
export function checkTarName(name: string): void {
  if (name === '' || name.startsWith('/') || name.includes('\0') || name.split('/').some((p) => p === '..' || p === '')) {
    throw new UsageError(`--tar ${JSON.stringify(name)}: the member name must be a relative path without empty or ".." parts`);
  }
}

/** The bytes in front of the member's data: a pax header when needed, then the ustar header. */
export function tarHeader(name: string, size: number, mtime = Date.now() / 1000): Uint8Array {
  checkTarName(name);
  const longName = Buffer.byteLength(name, 'utf8') > NAME_FIELD || /[^\x20-\x7e]/.test(name);
  const records = (size > MAX_OCTAL_SIZE ? paxRecord('size', String(size)) : '') + (longName ? paxRecord('path', name) : '');
  const ustarName = longName ? Buffer.from(name, 'utf8').subarray(0, NAME_FIELD).toString('latin1').replace(/[^\x20-\x7e]/g, '_') : name;
  const main = ustarHeader(ustarName, size, mtime, '0');
  if (!records) return main;
  const pax = Buffer.from(records, 'utf8');
  const paxName = `PaxHeaders/${ustarName}`.slice(0, NAME_FIELD);
  const out = new Uint8Array(TAR_BLOCK + pax.length + padToBlock(pax.length) + TAR_BLOCK);
  out.set(ustarHeader(paxName, pax.length, mtime, 'x'), 0);
  out.set(pax, TAR_BLOCK);
  out.set(main, out.length - TAR_BLOCK);
  return out;
}

/** Bytes after a member of `size` bytes: padding to a block, then the end-of-archive blocks. */
export function tarTrailerLength(size: number): number {
  return padToBlock(size) + 2 * TAR_BLOCK;
}

/** The whole tar stream's length for one member. */
export function tarLength(name: string, size: number): number {
  return tarHeader(name, size, 0).length + size + tarTrailerLength(size);
}

// ---------------------------------------------------------------------------------------------------
// Decoding (what a tar reader sees), for tests and for readers of such streams.

export interface TarMember {
  name: string;
  size: number;
  mtime: number;
  /** Bytes of headers in front of the data (pax header included). */
  headerLength: number;
}

function getString(buf: Uint8Array, at: number, length: number): string {
  const field = buf.subarray(at, at + length);
  const nul = field.indexOf(0);
  return Buffer.from(nul < 0 ? field : field.subarray(0, nul)).toString('utf8');
}

function getNumber(buf: Uint8Array, at: number, length: number, field: string): number {
  if (buf[at]! & 0x80) {
    let v = 0n;
    for (let i = 1; i < length; i++) v = (v << 8n) | BigInt(buf[at + i]!);
    return Number(v);
  }
  const text = getString(buf, at, length).trim();
  if (!/^[0-7]*$/.test(text)) throw new FormatError('tar', field, text, 'not an octal number');
  return text === '' ? 0 : parseInt(text, 8);
}

function checkBlock(h: Uint8Array, at: number): void {
  let sum = 0;
  for (let i = 0; i < TAR_BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
  const stored = getNumber(h, 148, 8, 'chksum');
  if (stored !== sum) throw new FormatError('tar', 'chksum', stored, `header at ${at} sums to ${sum}`);
  if (getString(h, 257, 6) !== 'ustar') throw new FormatError('tar', 'magic', getString(h, 257, 6), `header at ${at} is not ustar`);
}

/** The first member of a tar stream that starts with `bytes` (its headers must be complete). */
export function decodeTarHeader(bytes: Uint8Array): TarMember {
  let at = 0;
  const pax: Record<string, string> = {};
  for (;;) {
    if (bytes.length < at + TAR_BLOCK) throw new FormatError('tar', 'header', at, 'the headers end before a file member');
    const h = bytes.subarray(at, at + TAR_BLOCK);
    checkBlock(h, at);
    const type = String.fromCharCode(h[156]!);
    const size = getNumber(h, 124, 12, 'size');
    if (type === 'x') {
      // Records "LEN key=value\n"; LEN counts bytes, so they are cut from the bytes, not the text.
      const records = Buffer.from(bytes.subarray(at + TAR_BLOCK, at + TAR_BLOCK + size));
      for (let p = 0; p < records.length; ) {
        const space = records.indexOf(0x20, p);
        const len = parseInt(records.subarray(p, space).toString('latin1'), 10);
        if (space < 0 || !(len > space - p + 1) || p + len > records.length) throw new FormatError('tar', 'pax record', p, `malformed in the pax header at ${at}`);
        const kv = records.subarray(space + 1, p + len - 1).toString('utf8');
        const eq = kv.indexOf('=');
        pax[kv.slice(0, eq)] = kv.slice(eq + 1);
        p += len;
      }
      at += TAR_BLOCK + size + padToBlock(size);
      continue;
    }
    if (type !== '0' && type !== '\0') throw new FormatError('tar', 'typeflag', type, `header at ${at} is not a regular file`);
    return {
      name: pax.path ?? getString(h, 0, NAME_FIELD),
      size: pax.size !== undefined ? Number(pax.size) : size,
      mtime: getNumber(h, 136, 12, 'mtime'),
      headerLength: at + TAR_BLOCK,
    };
  }
}
