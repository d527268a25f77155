/**
 * The qcow2 header (host cluster 0, big-endian; docs/interop/qcow2.rst "Header"). decodeHeader only
 * reads fields; validateHeader applies QEMU's open-time rules (block/qcow2.c qcow2_do_open,
 * qcow2_validate_table) plus the in-file checks QEMU leaves to later reads.
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';

export const FORMAT = 'qcow2';
export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** Offset of the optional compression_type byte (present when header_length > 104). */
export const COMPRESSION_TYPE_OFFSET = 104;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits (block/qcow2.h): QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS. */
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
export const MAX_SNAPSHOTS = 65536;
export const SNAPSHOT_HEADER_BYTES = 40;
export const MAX_BACKING_NAME = 1023;

/** Incompatible feature bits (v3). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;
export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual size in bytes as stored (QEMU uses it rounded down to 512). */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** v3 fields; v2 reads them as QEMU does: 0 features, refcount_order 4, header_length 72. */
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  /** 0 (zlib) unless header_length > 104. */
  compressionType: number;
}

export function decodeHeader(buf: Uint8Array): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) {
    throw new FormatError(FORMAT, 'file size', buf.length, `shorter than the ${V2_HEADER_LENGTH}-byte version 2 header`);
  }
  const r = new FieldReader(buf, 'be', FORMAT);
  const magic = r.u32(0);
  if (magic !== QCOW2_MAGIC) throw new FormatError(FORMAT, 'magic', magic, 'not QFI\\xfb');
  const version = r.u32(4);
  const h: Qcow2Header = {
    version,
    backingFileOffset: r.u64(8, 'backing_file_offset'),
    backingFileSize: r.u32(16),
    clusterBits: r.u32(20),
    size: r.u64(24, 'size'),
    cryptMethod: r.u32(32),
    l1Size: r.u32(36),
    l1TableOffset: r.u64(40, 'l1_table_offset'),
    refcountTableOffset: r.u64(48, 'refcount_table_offset'),
    refcountTableClusters: r.u32(56),
    nbSnapshots: r.u32(60),
    snapshotsOffset: r.u64(64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_ZLIB,
  };
  if (version >= 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) {
      throw new FormatError(FORMAT, 'file size', buf.length, `shorter than the ${V3_MIN_HEADER_LENGTH}-byte version 3 header`);
    }
    h.incompatibleFeatures = r.u64big(72);
    h.compatibleFeatures = r.u64big(80);
    h.autoclearFeatures = r.u64big(88);
    h.refcountOrder = r.u32(96);
    h.headerLength = r.u32(100);
    if (h.headerLength > COMPRESSION_TYPE_OFFSET && buf.length > COMPRESSION_TYPE_OFFSET) h.compressionType = r.u8(COMPRESSION_TYPE_OFFSET);
  }
  return h;
}

/** The header's bytes: 72 for v2, header_length (at least 104) for v3. */
export function encodeHeader(h: Qcow2Header): Uint8Array {
  const len = h.version >= 3 ? Math.max(V3_MIN_HEADER_LENGTH, h.headerLength) : V2_HEADER_LENGTH;
  const buf = new Uint8Array(len);
  const w = new FieldWriter(buf, 'be');
  w.u32(0, QCOW2_MAGIC);
  w.u32(4, h.version);
  w.u64(8, h.backingFileOffset);
  w.u32(16, h.backingFileSize);
  w.u32(20, h.clusterBits);
  w.u64(24, h.size);
  w.u32(32, h.cryptMethod);
  w.u32(36, h.l1Size);
  w.u64(40, h.l1TableOffset);
  w.u64(48, h.refcountTableOffset);
  w.u32(56, h.refcountTableClusters);
  w.u32(60, h.nbSnapshots);
  w.u64(64, h.snapshotsOffset);
  if (h.version >= 3) {
    w.u64(72, h.incompatibleFeatures);
    w.u64(80, h.compatibleFeatures);
    w.u64(88, h.autoclearFeatures);
    w.u32(96, h.refcountOrder);
    w.u32(100, h.headerLength);
    if (len > COMPRESSION_TYPE_OFFSET) w.u8(COMPRESSION_TYPE_OFFSET, h.compressionType);
  }
  return buf;
}

export function clusterSizeOf(h: Qcow2Header): number {
  return 2 ** h.clusterBits;
}

export function hasExtendedL2(h: Qcow2Header): boolean {
  return (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
}

/** Bytes per L2 entry: 8, or 16 with extended L2 (a second u64 holds the subcluster bitmap). */
export function l2EntryBytes(h: Qcow2Header): number {
  return hasExtendedL2(h) ? 16 : 8;
}

/** Guest bytes one L1 entry covers. */
export function l1Coverage(h: Qcow2Header): number {
  const cs = clusterSizeOf(h);
  return cs * (cs / l2EntryBytes(h));
}

/** Virtual size as QEMU uses it: header.size / 512 sectors (qcow2_do_open). */
export function virtualSizeOf(h: Qcow2Header): number {
  return Math.floor(h.size / 512) * 512;
}

function bitList(mask: bigint): number[] {
  const out: number[] = [];
  for (let b = 0; b < 64; b++) if (mask & (1n << BigInt(b))) out.push(b);
  return out;
}

/**
 * A table of `entries` × `entryBytes` at `offset`: at most `maxBytes` (QEMU's limit), cluster-aligned,
 * not overflowing, and (when not empty) inside the file.
 */
export function validateTable(
  field: string,
  offsetField: string,
  offset: number,
  entries: number,
  entryBytes: number,
  maxBytes: number,
  clusterSize: number,
  fileSize: number,
): void {
  if (entries * entryBytes > maxBytes) {
    throw new FormatError(FORMAT, field, entries, `${entries * entryBytes} bytes exceeds QEMU's limit of ${maxBytes}`);
  }
  if (offset % clusterSize !== 0) throw new FormatError(FORMAT, offsetField, offset, `not aligned to the cluster size ${clusterSize}`);
  if (entries > 0 && offset + entries * entryBytes > fileSize) {
    throw new FormatError(FORMAT, offsetField, offset, `${entries * entryBytes} bytes from there run past the end of the file (${fileSize} bytes)`);
  }
}

/**
 * QEMU's open-time header checks, in its order. `featureNames` maps incompatible bits to names from
 * the image's feature-name table, for the message about an unknown bit.
 */
export function validateHeader(h: Qcow2Header, fileSize: number, featureNames: Map<number, string> = new Map()): void {
  if (h.version < 2 || h.version > 3) {
    throw new UnsupportedError(FORMAT, `version ${h.version}`, 'QEMU reads only qcow2 versions 2 and 3');
  }
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw new FormatError(FORMAT, 'cluster_bits', h.clusterBits, `must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 B..2 MiB clusters)`);
  }
  const cs = clusterSizeOf(h);
  if (h.version >= 3) {
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw new FormatError(FORMAT, 'header_length', h.headerLength, `less than ${V3_MIN_HEADER_LENGTH}`);
    if (h.headerLength % 8 !== 0) throw new FormatError(FORMAT, 'header_length', h.headerLength, 'not a multiple of 8');
  }
  if (h.headerLength > cs) throw new FormatError(FORMAT, 'header_length', h.headerLength, `exceeds the cluster size ${cs}`);
  if (h.backingFileOffset > cs) throw new FormatError(FORMAT, 'backing_file_offset', h.backingFileOffset, `beyond cluster 0 (${cs} bytes)`);
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > Math.min(MAX_BACKING_NAME, cs - h.backingFileOffset)) {
      throw new FormatError(FORMAT, 'backing_file_size', h.backingFileSize, `backing name must be at most ${MAX_BACKING_NAME} bytes and end inside cluster 0`);
    }
    if (h.backingFileOffset + h.backingFileSize > fileSize) {
      throw new FormatError(FORMAT, 'backing_file_offset', h.backingFileOffset, `the backing name runs past the end of the file (${fileSize} bytes)`);
    }
  }
  // Compression type (validate_compression_type): the incompatible bit must match a non-zlib type.
  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedError(FORMAT, `compression type ${h.compressionType}`, 'only zlib (0) and zstd (1) are defined');
  }
  const compressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (compressionBit !== (h.compressionType !== COMPRESSION_ZLIB)) {
    throw new FormatError(FORMAT, 'incompatible_features', h.incompatibleFeatures, `compression type bit (3) is ${compressionBit ? 'set' : 'clear'} but compression_type is ${h.compressionType}`);
  }
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const names = bitList(unknown).map((b) => (featureNames.has(b) ? `bit ${b} "${featureNames.get(b)}"` : `bit ${b}`));
    throw new UnsupportedError(FORMAT, 'incompatible feature', `${names.join(', ')} (unknown to this reader; QEMU refuses it too)`);
  }
  if (hasExtendedL2(h) && h.clusterBits < 14) {
    throw new FormatError(FORMAT, 'cluster_bits', h.clusterBits, 'extended L2 entries need clusters of at least 16 KiB (512-byte subclusters)');
  }
  if (h.refcountOrder > 6) throw new FormatError(FORMAT, 'refcount_order', h.refcountOrder, 'refcounts wider than 64 bits');
  if (h.cryptMethod > CRYPT_LUKS) throw new FormatError(FORMAT, 'crypt_method', h.cryptMethod, 'unknown encryption method (0 none, 1 AES, 2 LUKS)');
  if (h.refcountTableClusters === 0) throw new FormatError(FORMAT, 'refcount_table_clusters', 0, 'the image has no refcount table');
  validateTable('refcount_table_clusters', 'refcount_table_offset', h.refcountTableOffset, h.refcountTableClusters, cs, MAX_REFTABLE_BYTES, cs, fileSize);
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw new FormatError(FORMAT, 'nb_snapshots', h.nbSnapshots, `more than QEMU's ${MAX_SNAPSHOTS}`);
  validateTable('nb_snapshots', 'snapshots_offset', h.snapshotsOffset, h.nbSnapshots, SNAPSHOT_HEADER_BYTES, SNAPSHOT_HEADER_BYTES * MAX_SNAPSHOTS, cs, fileSize);
  validateTable('l1_size', 'l1_table_offset', h.l1TableOffset, h.l1Size, 8, MAX_L1_BYTES, cs, fileSize);
  const needed = Math.ceil(virtualSizeOf(h) / l1Coverage(h));
  if (needed > 0x7fffffff) throw new FormatError(FORMAT, 'size', h.size, 'image too big (L1 index beyond INT_MAX)');
  if (h.l1Size < needed) throw new FormatError(FORMAT, 'l1_size', h.l1Size, `too small for the virtual size ${h.size} (needs ${needed} entries)`);
  if (h.l1Size > 0 && h.l1TableOffset === 0) throw new FormatError(FORMAT, 'l1_table_offset', 0, 'the L1 table cannot be in cluster 0');
  if (h.refcountTableOffset === 0) throw new FormatError(FORMAT, 'refcount_table_offset', 0, 'the refcount table cannot be in cluster 0');
  if (h.nbSnapshots > 0 && h.snapshotsOffset === 0) throw new FormatError(FORMAT, 'snapshots_offset', 0, 'the snapshot table cannot be in cluster 0');
}
