/**
 * Persistent dirty bitmaps (qcow2.rst "Bitmaps extension"; block/qcow2-bitmap.c): a directory of
 * 24-byte-headed entries (8-byte aligned), each pointing at a bitmap table of u64 entries whose
 * bits 9..55 name a cluster of bitmap data (0 = all zeros, or all ones with bit 0 set).
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import { FormatError } from '../../src/errors.js';
import { entryOffset } from './entries.js';
import { FORMAT } from './header.js';

export const BITMAP_DIR_ENTRY_BYTES = 24;
/** Limits from block/qcow2-bitmap.c and qcow2.h. */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
export const BME_MAX_TABLE_SIZE = 0x8000000;
export const BME_MAX_NAME_SIZE = 1023;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_RESERVED_FLAGS = ~7 >>> 0;
export const BT_DIRTY_TRACKING_BITMAP = 1;

export interface BitmapDirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extraData: Uint8Array;
}

function entryBytes(nameLen: number, extraLen: number): number {
  return Math.ceil((BITMAP_DIR_ENTRY_BYTES + nameLen + extraLen) / 8) * 8;
}

/** Decodes a directory of `count` entries; it must fill `buf` exactly (QEMU bitmap_list_load). */
export function decodeBitmapDirectory(buf: Uint8Array, count: number): BitmapDirEntry[] {
  const r = new FieldReader(buf, 'be', FORMAT);
  const out: BitmapDirEntry[] = [];
  let pos = 0;
  while (pos < buf.length) {
    if (pos + BITMAP_DIR_ENTRY_BYTES > buf.length) throw new FormatError(FORMAT, 'bitmap directory', pos, 'entry runs past the directory');
    const nameSize = r.u16(pos + 18);
    const extraSize = r.u32(pos + 20);
    const size = entryBytes(nameSize, extraSize);
    if (pos + size > buf.length) throw new FormatError(FORMAT, 'bitmap directory', pos, 'entry runs past the directory');
    const extraStart = pos + BITMAP_DIR_ENTRY_BYTES;
    out.push({
      tableOffset: r.u64(pos, 'bitmap_table_offset'),
      tableSize: r.u32(pos + 8),
      flags: r.u32(pos + 12),
      type: r.u8(pos + 16),
      granularityBits: r.u8(pos + 17),
      extraData: buf.slice(extraStart, extraStart + extraSize),
      name: Buffer.from(buf.subarray(extraStart + extraSize, extraStart + extraSize + nameSize)).toString('utf8'),
    });
    pos += size;
    if (out.length > count) break;
  }
  if (out.length !== count) throw new FormatError(FORMAT, 'nb_bitmaps', count, `the bitmap directory holds ${out.length} entries`);
  return out;
}

export function encodeBitmapDirectory(entries: BitmapDirEntry[]): Uint8Array {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  const size = entries.reduce((n, e, i) => n + entryBytes(names[i]!.length, e.extraData.length), 0);
  const buf = new Uint8Array(size);
  const w = new FieldWriter(buf, 'be');
  let pos = 0;
  entries.forEach((e, i) => {
    w.u64(pos, e.tableOffset);
    w.u32(pos + 8, e.tableSize);
    w.u32(pos + 12, e.flags);
    w.u8(pos + 16, e.type);
    w.u8(pos + 17, e.granularityBits);
    w.u16(pos + 18, names[i]!.length);
    w.u32(pos + 20, e.extraData.length);
    w.bytes(pos + 24, e.extraData);
    w.bytes(pos + 24 + e.extraData.length, names[i]!);
    pos += entryBytes(names[i]!.length, e.extraData.length);
  });
  return buf;
}

/** QEMU check_dir_entry: the reason an entry is invalid, or null. */
export function dirEntryProblem(e: BitmapDirEntry, clusterSize: number): string | null {
  if (e.tableSize === 0) return 'bitmap table size is 0';
  if (e.tableOffset === 0 || e.tableOffset % clusterSize !== 0) return `bitmap table offset ${e.tableOffset} is 0 or not cluster-aligned`;
  if (e.tableSize > BME_MAX_TABLE_SIZE) return `bitmap table size ${e.tableSize} exceeds ${BME_MAX_TABLE_SIZE}`;
  if (e.granularityBits < BME_MIN_GRANULARITY_BITS || e.granularityBits > BME_MAX_GRANULARITY_BITS) return `granularity_bits ${e.granularityBits} outside ${BME_MIN_GRANULARITY_BITS}..${BME_MAX_GRANULARITY_BITS}`;
  if (e.flags & BME_RESERVED_FLAGS) return `reserved flags set (0x${e.flags.toString(16)})`;
  if (e.name.length > BME_MAX_NAME_SIZE) return 'name too long';
  if (e.type !== BT_DIRTY_TRACKING_BITMAP) return `type ${e.type} is not a dirty tracking bitmap`;
  return null;
}

/** Bitmap table entry: reserved mask 0xff000000000001fe; with an offset, bit 0 must be clear (QEMU check_table_entry). */
export function bitmapTableEntryProblem(hi: number, lo: number, clusterSize: number): string | null {
  if (hi & 0xff000000 || lo & 0x1fe) return 'reserved bits set';
  const offset = bitmapTableEntryOffset(hi, lo);
  if (offset !== 0 && (lo & 1)) return 'all-ones flag set on an allocated entry';
  if (offset % clusterSize !== 0) return `offset ${offset} not cluster-aligned`;
  return null;
}

export function bitmapTableEntryOffset(hi: number, lo: number): number {
  return entryOffset(hi, lo);
}
