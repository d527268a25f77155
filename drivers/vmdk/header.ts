/**
 * The hosted sparse extent header (SparseExtentHeader, 512 bytes at sector 0, little-endian) and its
 * validation. Decoding never throws (it is a plain field split, u64s kept as bigint so GD_AT_END and
 * hostile values survive); `validateSparseHeader` then turns it into checked byte numbers, refusing
 * what QEMU's vmdk_open_vmdk4 / vmdk_add_extent refuse and a little more (see the comments).
 */
import { FieldReader, FieldWriter, isPowerOfTwo } from '../../src/binary.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';

export const FORMAT = 'vmdk';
export const SECTOR = 512;
export const HEADER_BYTES = 512;

/** "KDMV" read as a little-endian u32 (the bytes are 'K','D','M','V'). */
export const VMDK4_MAGIC = 0x564d444b;
/** "COWD": the VMDK3 / vmfsSparse header, which imgconv does not read. */
export const VMDK3_MAGIC = 0x44574f43;

export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
export const FLAG_MARKER = 1 << 17;

/** gdOffset value saying the real header is in the footer (streamOptimized written as a stream). */
export const GD_AT_END = 0xffffffffffffffffn;
export const COMPRESSION_NONE = 0;
export const COMPRESSION_DEFLATE = 1;

/** QEMU vmdk_add_extent: "Invalid granularity" above 1 GiB grains. */
export const MAX_GRAIN_SECTORS = 0x200000;
/** QEMU vmdk_open_vmdk4: "L2 table size too big". */
export const MAX_GTES_PER_GT = 512;
/** QEMU vmdk_add_extent: "L1 size too big". */
export const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** GD and GT entries are u32 sector numbers (VMDK_EXTENT_MAX_SECTORS). */
export const MAX_SECTOR_FIELD = 2 ** 32;

export interface SparseExtentHeader {
  magic: number;
  version: number;
  flags: number;
  /** Sectors. */
  capacity: bigint;
  /** Sectors per grain. */
  grainSize: bigint;
  /** Sector of the embedded descriptor, 0 when none. */
  descriptorOffset: bigint;
  /** Sectors. */
  descriptorSize: bigint;
  numGTEsPerGT: number;
  /** Sector of the redundant grain directory (used when FLAG_RGD is set). */
  rgdOffset: bigint;
  /** Sector of the grain directory, or GD_AT_END. */
  gdOffset: bigint;
  /** Sectors of metadata before the first grain. */
  overHead: bigint;
  uncleanShutdown: number;
  /** '\n', ' ', '\r', '\n' when intact (FLAG_NL_DETECT). */
  singleEndLineChar: number;
  nonEndLineChar: number;
  doubleEndLineChar1: number;
  doubleEndLineChar2: number;
  compressAlgorithm: number;
}

export function decodeSparseHeader(buf: Uint8Array): SparseExtentHeader {
  if (buf.length < 79) throw new FormatError(FORMAT, 'header', buf.length, 'shorter than the 79 bytes of a SparseExtentHeader');
  const r = new FieldReader(buf, 'le', FORMAT);
  return {
    magic: r.u32(0),
    version: r.u32(4),
    flags: r.u32(8),
    capacity: r.u64big(12),
    grainSize: r.u64big(20),
    descriptorOffset: r.u64big(28),
    descriptorSize: r.u64big(36),
    numGTEsPerGT: r.u32(44),
    rgdOffset: r.u64big(48),
    gdOffset: r.u64big(56),
    overHead: r.u64big(64),
    uncleanShutdown: r.u8(72),
    singleEndLineChar: r.u8(73),
    nonEndLineChar: r.u8(74),
    doubleEndLineChar1: r.u8(75),
    doubleEndLineChar2: r.u8(76),
    compressAlgorithm: r.u16(77),
  };
}

export function encodeSparseHeader(h: SparseExtentHeader): Uint8Array {
  const buf = new Uint8Array(HEADER_BYTES);
  const w = new FieldWriter(buf, 'le');
  w.u32(0, h.magic);
  w.u32(4, h.version);
  w.u32(8, h.flags);
  w.u64(12, h.capacity);
  w.u64(20, h.grainSize);
  w.u64(28, h.descriptorOffset);
  w.u64(36, h.descriptorSize);
  w.u32(44, h.numGTEsPerGT);
  w.u64(48, h.rgdOffset);
  w.u64(56, h.gdOffset);
  w.u64(64, h.overHead);
  w.u8(72, h.uncleanShutdown);
  w.u8(73, h.singleEndLineChar);
  w.u8(74, h.nonEndLineChar);
  w.u8(75, h.doubleEndLineChar1);
  w.u8(76, h.doubleEndLineChar2);
  w.u16(77, h.compressAlgorithm);
  return buf;
}

/** The header fields, checked and in bytes. */
export interface SparseGeometry {
  version: number;
  flags: number;
  capacitySectors: number;
  virtualSize: number;
  grainSectors: number;
  grainBytes: number;
  gtesPerGt: number;
  /** Bytes of one grain table (numGTEsPerGT × 4). */
  gtBytes: number;
  /** Guest bytes one grain table covers. */
  gtCoverage: number;
  gdEntries: number;
  gdOffset: number;
  /** Redundant GD byte offset when FLAG_RGD is set and rgdOffset ≠ 0. */
  rgdOffset?: number;
  /** Embedded descriptor byte range, when there is one. */
  descriptorOffset?: number;
  descriptorLength: number;
  overHead: number;
  zeroedGrain: boolean;
  compressed: boolean;
  markers: boolean;
  dirty: boolean;
}

function sectorsToBytes(v: bigint, field: string): number {
  const bytes = v * 512n;
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new FormatError(FORMAT, field, v, 'sector count beyond 2^53 bytes');
  }
  return Number(bytes);
}

/** Largest embedded descriptor read (QEMU reads at most 1 MiB of descriptor). */
export const MAX_DESCRIPTOR_BYTES = 1 << 20;

/**
 * Checks a header (the footer's, for GD_AT_END images) against the file size. Throws FormatError for
 * corrupt or hostile values and UnsupportedError for valid images imgconv does not read.
 */
export function validateSparseHeader(h: SparseExtentHeader, fileSize: number): SparseGeometry {
  if (h.magic !== VMDK4_MAGIC) throw new FormatError(FORMAT, 'magic', h.magic, 'not "KDMV"');
  if (h.version === 0) throw new FormatError(FORMAT, 'version', h.version, 'must be 1, 2 or 3');
  if (h.version > 3) throw new UnsupportedError(FORMAT, 'version', `sparse extent version ${h.version} (imgconv, like QEMU, reads versions 1 to 3)`);
  if ((h.flags & FLAG_NL_DETECT) !== 0) {
    // VMware's check that the file was not transferred in text mode (QEMU ignores it).
    const ok = h.singleEndLineChar === 0x0a && h.nonEndLineChar === 0x20 && h.doubleEndLineChar1 === 0x0d && h.doubleEndLineChar2 === 0x0a;
    if (!ok) {
      const got = [h.singleEndLineChar, h.nonEndLineChar, h.doubleEndLineChar1, h.doubleEndLineChar2].map((b) => b.toString(16).padStart(2, '0')).join(' ');
      throw new FormatError(FORMAT, 'newline check bytes', got, 'expected 0a 20 0d 0a: the file was damaged by a text-mode transfer');
    }
  }
  if (h.compressAlgorithm !== COMPRESSION_NONE && h.compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new UnsupportedError(FORMAT, 'compressAlgorithm', `${h.compressAlgorithm} (only 0 = none and 1 = deflate exist)`);
  }
  const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
  const markers = (h.flags & FLAG_MARKER) !== 0;
  if (compressed && !markers) {
    // Without a grain marker the compressed length is unknown; QEMU guesses one grain. No tool writes it.
    throw new UnsupportedError(FORMAT, 'compressed grains without markers', 'flags lack bit 17 (markers) while compressAlgorithm = deflate');
  }
  if (h.grainSize === 0n || h.grainSize > BigInt(MAX_GRAIN_SECTORS) || !isPowerOfTwo(Number(h.grainSize))) {
    throw new FormatError(FORMAT, 'grainSize', h.grainSize, `must be a power of two from 1 to ${MAX_GRAIN_SECTORS} sectors`);
  }
  if (h.numGTEsPerGT === 0 || h.numGTEsPerGT > MAX_GTES_PER_GT) {
    throw new FormatError(FORMAT, 'numGTEsPerGT', h.numGTEsPerGT, `must be 1 to ${MAX_GTES_PER_GT}`);
  }
  if (h.capacity === 0n && h.descriptorOffset !== 0n) {
    // QEMU then reads the embedded descriptor as a descriptor file naming other extents.
    throw new UnsupportedError(FORMAT, 'capacity 0 with a descriptor', 'a sparse file whose descriptor lists other extents; convert it with `qemu-img convert` first');
  }
  const virtualSize = sectorsToBytes(h.capacity, 'capacity');
  const grainSectors = Number(h.grainSize);
  const grainBytes = grainSectors * SECTOR;
  const gtCoverage = grainBytes * h.numGTEsPerGT;
  const capacitySectors = virtualSize / SECTOR;
  const gdEntries = Math.ceil(virtualSize / gtCoverage);
  if (gdEntries > MAX_GD_ENTRIES) {
    throw new FormatError(FORMAT, 'capacity', h.capacity, `needs ${gdEntries} grain directory entries, more than QEMU's ${MAX_GD_ENTRIES}`);
  }
  const overHead = sectorsToBytes(h.overHead, 'overHead');
  if (fileSize < overHead) {
    throw new FormatError(FORMAT, 'overHead', h.overHead, `file truncated: ${fileSize} bytes, expecting at least ${overHead}`);
  }
  if (h.gdOffset === GD_AT_END) throw new FormatError(FORMAT, 'gdOffset', h.gdOffset, 'GD_AT_END in the footer itself');
  if (h.gdOffset === 0n && gdEntries > 0) throw new FormatError(FORMAT, 'gdOffset', 0, 'the grain directory cannot be at sector 0 (the header)');
  if (h.gdOffset >= BigInt(MAX_SECTOR_FIELD)) throw new FormatError(FORMAT, 'gdOffset', h.gdOffset, 'beyond the 2^32-sector limit of VMDK offsets');
  const gdOffset = Number(h.gdOffset) * SECTOR;
  if (gdOffset + gdEntries * 4 > fileSize) {
    throw new FormatError(FORMAT, 'gdOffset', h.gdOffset, `the grain directory (${gdEntries} entries) runs past the end of the file (${fileSize} bytes)`);
  }
  let rgdOffset: number | undefined;
  if ((h.flags & FLAG_RGD) !== 0 && h.rgdOffset !== 0n) {
    if (h.rgdOffset >= BigInt(MAX_SECTOR_FIELD)) throw new FormatError(FORMAT, 'rgdOffset', h.rgdOffset, 'beyond the 2^32-sector limit of VMDK offsets');
    rgdOffset = Number(h.rgdOffset) * SECTOR;
    if (rgdOffset + gdEntries * 4 > fileSize) {
      throw new FormatError(FORMAT, 'rgdOffset', h.rgdOffset, `the redundant grain directory runs past the end of the file (${fileSize} bytes)`);
    }
  }
  let descriptorOffset: number | undefined;
  let descriptorLength = 0;
  if (h.descriptorOffset !== 0n) {
    if (h.descriptorOffset >= BigInt(MAX_SECTOR_FIELD)) throw new FormatError(FORMAT, 'descriptorOffset', h.descriptorOffset, 'beyond the 2^32-sector limit');
    if (h.descriptorSize > BigInt(MAX_DESCRIPTOR_BYTES / SECTOR)) {
      throw new FormatError(FORMAT, 'descriptorSize', h.descriptorSize, `larger than ${MAX_DESCRIPTOR_BYTES / SECTOR} sectors (1 MiB)`);
    }
    descriptorOffset = Number(h.descriptorOffset) * SECTOR;
    descriptorLength = Number(h.descriptorSize) * SECTOR;
    if (descriptorOffset + descriptorLength > fileSize) {
      throw new FormatError(FORMAT, 'descriptorOffset', h.descriptorOffset, `the descriptor (${h.descriptorSize} sectors) runs past the end of the file`);
    }
  }
  return {
    version: h.version,
    flags: h.flags,
    capacitySectors,
    virtualSize,
    grainSectors,
    grainBytes,
    gtesPerGt: h.numGTEsPerGT,
    gtBytes: h.numGTEsPerGT * 4,
    gtCoverage,
    gdEntries,
    gdOffset,
    ...(rgdOffset !== undefined ? { rgdOffset } : {}),
    ...(descriptorOffset !== undefined ? { descriptorOffset } : {}),
    descriptorLength,
    overHead,
    // QEMU honours the flag whatever the version (extent->has_zero_grain).
    zeroedGrain: (h.flags & FLAG_ZERO_GRAIN) !== 0,
    compressed,
    markers,
    dirty: h.uncleanShutdown !== 0,
  };
}
