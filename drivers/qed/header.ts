/**
 * The QED header: 64 bytes, little-endian, at offset 0 of the first header cluster (spec:
 * docs/interop/qed_spec.rst; QEMU: block/qed.h QEDHeader, validation in block/qed.c bdrv_qed_do_open).
 *
 * decodeHeader/encodeHeader are the plain field codec (u64 fields stay bigint so any on-disk value
 * round-trips); validateHeader applies QEMU's open-time rules and yields checked JS numbers.
 */
import { FieldReader, FieldWriter, isPowerOfTwo, safeU64 } from '../../src/binary.js';
import { FormatError, UnsupportedError, formatValue } from '../../src/errors.js';

export const QED = 'qed';
export const QED_MAGIC = 'QED\0';
export const QED_HEADER_BYTES = 64;

/** The image has a backing file, named at backing_filename_offset. */
export const QED_F_BACKING_FILE = 0x01n;
/** Not closed cleanly: QEMU runs a repairing check on its next read-write open. */
export const QED_F_NEED_CHECK = 0x02n;
/** The backing file is raw and must not be probed. */
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;
export const QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE;
/** No compat or autoclear features are defined (qed.h QED_COMPAT_FEATURE_MASK, QED_AUTOCLEAR_FEATURE_MASK). */
export const QED_COMPAT_FEATURE_MASK = 0n;
export const QED_AUTOCLEAR_FEATURE_MASK = 0n;

export const QED_MIN_CLUSTER_SIZE = 4096;
export const QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const QED_MIN_TABLE_SIZE = 1;
export const QED_MAX_TABLE_SIZE = 16;
/** qed_read_string refuses names that do not fit bs->auto_backing_file (PATH_MAX) with their NUL. */
export const QED_MAX_BACKING_NAME = 4095;
const UINT32_MAX = 0xffffffff;
const SECTOR = 512;

/** The header exactly as stored. */
export interface QedHeader {
  magic: string;
  /** Bytes per cluster. */
  clusterSize: number;
  /** Clusters per L1 or L2 table. */
  tableSize: number;
  /** Clusters reserved for the header area at the start of the file. */
  headerSize: number;
  features: bigint;
  compatFeatures: bigint;
  autoclearFeatures: bigint;
  l1TableOffset: bigint;
  /** Virtual disk size in bytes. */
  imageSize: bigint;
  /** Byte offset of the backing file name from the start of the file. */
  backingFilenameOffset: number;
  backingFilenameSize: number;
}

export function decodeHeader(bytes: Uint8Array): QedHeader {
  if (bytes.length < QED_HEADER_BYTES) {
    throw new FormatError(QED, 'header', bytes.length, `needs ${QED_HEADER_BYTES} bytes; the file is shorter`);
  }
  const r = new FieldReader(bytes, 'le', QED);
  return {
    magic: r.ascii(0, 4),
    clusterSize: r.u32(4),
    tableSize: r.u32(8),
    headerSize: r.u32(12),
    features: r.u64big(16),
    compatFeatures: r.u64big(24),
    autoclearFeatures: r.u64big(32),
    l1TableOffset: r.u64big(40),
    imageSize: r.u64big(48),
    backingFilenameOffset: r.u32(56),
    backingFilenameSize: r.u32(60),
  };
}

export function encodeHeader(h: QedHeader): Uint8Array {
  const buf = new Uint8Array(QED_HEADER_BYTES);
  const w = new FieldWriter(buf, 'le');
  w.ascii(0, h.magic.slice(0, 4).padEnd(4, '\0'));
  w.u32(4, h.clusterSize);
  w.u32(8, h.tableSize);
  w.u32(12, h.headerSize);
  w.u64(16, h.features);
  w.u64(24, h.compatFeatures);
  w.u64(32, h.autoclearFeatures);
  w.u64(40, h.l1TableOffset);
  w.u64(48, h.imageSize);
  w.u32(56, h.backingFilenameOffset);
  w.u32(60, h.backingFilenameSize);
  return buf;
}

/** A header that passed validation, with every offset and size as a safe JS number. */
export interface QedGeometry {
  header: QedHeader;
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  /** header_size · cluster_size: nothing but the header and the backing name may live below this. */
  headerBytes: number;
  /** Bytes per L1 or L2 table (table_size · cluster_size). */
  tableBytes: number;
  /** u64 entries per table. */
  tableEntries: number;
  /** Guest bytes one L2 table maps. */
  l2Span: number;
  l1TableOffset: number;
  virtualSize: number;
  fileSize: number;
  /**
   * The file size rounded down to a cluster. QEMU keeps exactly this as s->file_size: a table or data
   * cluster must lie wholly below it, and qed-check counts leaks only below it.
   */
  fileClustersEnd: number;
  hasBacking: boolean;
  needCheck: boolean;
  backingNoProbe: boolean;
}

/** (table_size·cs/8)²·cs, as qed.c qed_max_image_size; up to 2^80, hence bigint. */
export function qedMaxImageSize(clusterSize: number, tableSize: number): bigint {
  const entries = BigInt((tableSize * clusterSize) / 8);
  return entries * entries * BigInt(clusterSize);
}

function bitList(bits: bigint): string {
  const out: number[] = [];
  for (let i = 0; bits >> BigInt(i) !== 0n; i++) if ((bits >> BigInt(i)) & 1n) out.push(i);
  return out.join(', ');
}

/**
 * QEMU's open-time validation (bdrv_qed_do_open), made stricter only where QEMU's rule is a bug:
 * header_size must be ≥ 1 (the header itself lives in cluster 0), and a one-cluster table is
 * accepted (QEMU's qed_check_table_offset treats offset + 0 as an overflow, so QEMU cannot open any
 * image created with table_size=1, although its own create accepts it).
 */
export function validateHeader(h: QedHeader, fileSize: number): QedGeometry {
  if (h.magic !== QED_MAGIC) throw new FormatError(QED, 'magic', h.magic, 'is not "QED\\0"');
  const unknown = h.features & ~QED_FEATURE_MASK;
  if (unknown !== 0n) {
    const bits = bitList(unknown);
    throw new UnsupportedError(
      QED,
      `feature bit${bits.includes(',') ? 's' : ''} ${bits}`,
      `features = ${formatValue(h.features)} sets bits this reader does not know (QEMU refuses them too: "Unsupported QED features: ${unknown.toString(16)}")`,
    );
  }
  const cs = h.clusterSize;
  if (cs < QED_MIN_CLUSTER_SIZE || cs > QED_MAX_CLUSTER_SIZE || !isPowerOfTwo(cs)) {
    throw new FormatError(QED, 'cluster_size', cs, `must be a power of two in [${QED_MIN_CLUSTER_SIZE}, ${QED_MAX_CLUSTER_SIZE}]`);
  }
  const ts = h.tableSize;
  if (ts < QED_MIN_TABLE_SIZE || ts > QED_MAX_TABLE_SIZE || !isPowerOfTwo(ts)) {
    throw new FormatError(QED, 'table_size', ts, `must be a power of two in [${QED_MIN_TABLE_SIZE}, ${QED_MAX_TABLE_SIZE}] clusters`);
  }
  if (h.imageSize % BigInt(SECTOR) !== 0n) {
    throw new FormatError(QED, 'image_size', h.imageSize, `must be a multiple of ${SECTOR}`);
  }
  const max = qedMaxImageSize(cs, ts);
  if (h.imageSize > max) {
    throw new FormatError(QED, 'image_size', h.imageSize, `exceeds ${max}, the most cluster_size ${cs} and table_size ${ts} can address`);
  }
  const virtualSize = safeU64(h.imageSize, QED, 'image_size');
  if (h.headerSize < 1) throw new FormatError(QED, 'header_size', h.headerSize, 'must be at least 1 cluster (the header lives in cluster 0)');
  // bdrv_qed_do_open: "Header size calculation must not overflow uint32_t".
  if (h.headerSize > Math.floor(UINT32_MAX / cs)) {
    throw new FormatError(QED, 'header_size', h.headerSize, `${h.headerSize} clusters of ${cs} bytes overflow 32 bits`);
  }
  const headerBytes = h.headerSize * cs;
  const tableBytes = ts * cs;
  const fileClustersEnd = Math.floor(fileSize / cs) * cs;
  const l1 = h.l1TableOffset;
  if (l1 % BigInt(cs) !== 0n) throw new FormatError(QED, 'l1_table_offset', l1, `is not a multiple of the cluster size ${cs}`);
  if (l1 < BigInt(headerBytes)) throw new FormatError(QED, 'l1_table_offset', l1, `lies inside the header area (first ${headerBytes} bytes)`);
  if (l1 + BigInt(tableBytes) > BigInt(fileClustersEnd)) {
    throw new FormatError(
      QED,
      'l1_table_offset',
      l1,
      `the ${tableBytes}-byte L1 table runs past the last whole cluster of the file (${fileSize} bytes)`,
    );
  }
  const hasBacking = (h.features & QED_F_BACKING_FILE) !== 0n;
  if (hasBacking) {
    if (h.backingFilenameOffset + h.backingFilenameSize > headerBytes) {
      throw new FormatError(
        QED,
        'backing_filename_offset',
        h.backingFilenameOffset,
        `the ${h.backingFilenameSize}-byte name runs past the header area (${headerBytes} bytes)`,
      );
    }
    if (h.backingFilenameSize > QED_MAX_BACKING_NAME) {
      throw new FormatError(QED, 'backing_filename_size', h.backingFilenameSize, `is longer than QEMU's limit of ${QED_MAX_BACKING_NAME} bytes`);
    }
  }
  const tableEntries = tableBytes / 8;
  return {
    header: h,
    clusterSize: cs,
    tableSize: ts,
    headerSize: h.headerSize,
    headerBytes,
    tableBytes,
    tableEntries,
    l2Span: tableEntries * cs,
    l1TableOffset: Number(l1),
    virtualSize,
    fileSize,
    fileClustersEnd,
    hasBacking,
    needCheck: (h.features & QED_F_NEED_CHECK) !== 0n,
    backingNoProbe: (h.features & QED_F_BACKING_FORMAT_NO_PROBE) !== 0n,
  };
}

/**
 * The backing file name: backing_filename_size bytes, cut at a NUL as QEMU's C string would be.
 * An empty name means no backing file (QEMU opens none).
 */
export function decodeBackingName(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return Buffer.from(nul < 0 ? bytes : bytes.subarray(0, nul)).toString('utf8');
}
