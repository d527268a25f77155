/**
 * Opening a qcow2 image: the header, its extensions, the backing name, the snapshot table and the
 * external data file, each validated before it is trusted (block/qcow2.c qcow2_do_open and
 * qcow2_read_extensions). The result is a plain description the mapping, host-space and check
 * code share.
 */
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import type { OpenContext } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE } from './bitmaps.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  CRYPT_LUKS,
  FORMAT,
  INCOMPAT_DATA_FILE,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  V2_HEADER_LENGTH,
  clusterSizeOf,
  decodeHeader,
  hasExtendedL2,
  l2EntryBytes,
  validateHeader,
  virtualSizeOf,
  type Qcow2Header,
} from './header.js';
import {
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  decodeBitmapsExtension,
  decodeCryptoExtension,
  decodeExtensions,
  decodeFeatureTable,
  extensionString,
  type BitmapsExtension,
  type CryptoExtension,
  type FeatureName,
  type HeaderExtension,
} from './extensions.js';
import { readSnapshotTable, type Qcow2Snapshot } from './snapshots.js';

/** QEMU keeps the backing format in a 16-byte buffer (bs->backing_format). */
const MAX_BACKING_FORMAT = 15;

export interface Qcow2Layout {
  dev: BlockDevice;
  fileSize: number;
  header: Qcow2Header;
  clusterSize: number;
  clusterBits: number;
  extendedL2: boolean;
  /** Bytes per L2 entry (8 or 16) and entries per L2 table. */
  l2EntryBytes: number;
  l2Entries: number;
  virtualSize: number;
  extensions: HeaderExtension[];
  featureNames: FeatureName[];
  backingFile?: string;
  backingFormat?: string;
  /** The bitmaps extension, when QEMU would use it (autoclear bit 0 set). */
  bitmaps?: BitmapsExtension;
  /** A bitmaps extension QEMU ignores because the autoclear bit is clear (bitmaps inconsistent). */
  staleBitmaps: boolean;
  crypto?: CryptoExtension;
  /** Name of the external data file (incompatible bit 2). */
  dataFileName?: string;
  snapshots: Qcow2Snapshot[];
  snapshotTableSize: number;
}

/** Cluster-size and header-length sanity, enough to walk the extensions for the feature-name table. */
function extensionAreaSane(h: Qcow2Header): boolean {
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) return false;
  const cs = clusterSizeOf(h);
  return h.headerLength >= V2_HEADER_LENGTH && h.headerLength <= cs && h.backingFileOffset <= cs;
}

export async function readLayout(dev: BlockDevice): Promise<Qcow2Layout> {
  const fileSize = await dev.size();
  const header = decodeHeader(await readAt(dev, 0, Math.min(fileSize, 112)));
  // QEMU walks the extensions before refusing unknown incompatible bits, to name them.
  let extensions: HeaderExtension[] = [];
  let extError: unknown;
  let cluster0: Uint8Array = new Uint8Array(0);
  if (extensionAreaSane(header)) {
    const cs = clusterSizeOf(header);
    cluster0 = await readAt(dev, 0, cs);
    try {
      extensions = decodeExtensions(cluster0, header.version >= 3 ? header.headerLength : V2_HEADER_LENGTH, header.backingFileOffset || cs);
    } catch (e) {
      extError = e;
    }
  }
  const featureNames = extensions.filter((e) => e.type === EXT_FEATURE_TABLE).flatMap((e) => decodeFeatureTable(e.data));
  validateHeader(header, fileSize, new Map(featureNames.filter((f) => f.type === 0).map((f) => [f.bit, f.name])));
  if (extError) throw extError;

  const clusterSize = clusterSizeOf(header);
  const layout: Qcow2Layout = {
    dev,
    fileSize,
    header,
    clusterSize,
    clusterBits: header.clusterBits,
    extendedL2: hasExtendedL2(header),
    l2EntryBytes: l2EntryBytes(header),
    l2Entries: clusterSize / l2EntryBytes(header),
    virtualSize: virtualSizeOf(header),
    extensions,
    featureNames,
    staleBitmaps: false,
    snapshots: [],
    snapshotTableSize: 0,
  };
  for (const ext of extensions) readExtension(layout, ext);

  if (header.cryptMethod === CRYPT_LUKS && !layout.crypto) {
    throw new FormatError(FORMAT, 'crypt_method', header.cryptMethod, 'LUKS encryption without the full disk encryption header extension');
  }
  const dataFileBit = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (dataFileBit && layout.dataFileName === undefined) {
    throw new UnsupportedError(FORMAT, 'external data file', 'the image names no data file (QEMU needs its data-file option here)');
  }
  if (!dataFileBit) delete layout.dataFileName;
  if (!dataFileBit && (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) {
    throw new FormatError(FORMAT, 'autoclear_features', header.autoclearFeatures, 'data_file_raw (bit 1) set without an external data file');
  }
  if (header.backingFileOffset !== 0) {
    const name = cluster0.subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize);
    layout.backingFile = Buffer.from(name).toString('utf8');
  }
  if (header.nbSnapshots > 0) {
    const t = await readSnapshotTable(dev, header.snapshotsOffset, header.nbSnapshots, fileSize);
    layout.snapshots = t.snapshots;
    layout.snapshotTableSize = t.size;
  }
  return layout;
}

function readExtension(layout: Qcow2Layout, ext: HeaderExtension): void {
  const h = layout.header;
  switch (ext.type) {
    case EXT_BACKING_FORMAT:
      if (ext.data.length > MAX_BACKING_FORMAT) {
        throw new FormatError(FORMAT, 'backing format extension length', ext.data.length, `longer than QEMU's ${MAX_BACKING_FORMAT} bytes`);
      }
      layout.backingFormat = extensionString(ext.data);
      return;
    case EXT_BITMAPS: {
      const b = decodeBitmapsExtension(ext.data);
      if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) {
        // A program without bitmap support changed the image: QEMU drops the bitmaps (their clusters leak).
        layout.staleBitmaps = true;
        return;
      }
      if (b.reserved !== 0) throw new FormatError(FORMAT, 'bitmaps extension reserved', b.reserved, 'must be zero');
      if (b.nbBitmaps === 0 || b.nbBitmaps > MAX_BITMAPS) throw new FormatError(FORMAT, 'nb_bitmaps', b.nbBitmaps, `must be 1..${MAX_BITMAPS}`);
      if (b.directoryOffset % layout.clusterSize !== 0) throw new FormatError(FORMAT, 'bitmap_directory_offset', b.directoryOffset, 'not cluster-aligned');
      if (b.directorySize > MAX_BITMAP_DIRECTORY_SIZE) throw new FormatError(FORMAT, 'bitmap_directory_size', b.directorySize, `exceeds ${MAX_BITMAP_DIRECTORY_SIZE}`);
      if (b.directoryOffset + b.directorySize > layout.fileSize) {
        throw new FormatError(FORMAT, 'bitmap_directory_offset', b.directoryOffset, `the ${b.directorySize}-byte directory runs past the end of the file`);
      }
      layout.bitmaps = b;
      return;
    }
    case EXT_CRYPTO: {
      if (h.cryptMethod !== CRYPT_LUKS) throw new FormatError(FORMAT, 'crypt_method', h.cryptMethod, 'full disk encryption header extension without LUKS encryption');
      const c = decodeCryptoExtension(ext.data);
      if (c.offset % layout.clusterSize !== 0) throw new FormatError(FORMAT, 'crypto header offset', c.offset, 'not cluster-aligned');
      if (c.offset === 0 || c.offset + c.length > layout.fileSize) {
        throw new FormatError(FORMAT, 'crypto header offset', c.offset, `the ${c.length}-byte LUKS header is not inside the file after cluster 0`);
      }
      layout.crypto = c;
      return;
    }
    case EXT_DATA_FILE:
      if (ext.data.length === 0) throw new FormatError(FORMAT, 'data file extension length', 0, 'empty data file name');
      layout.dataFileName = extensionString(ext.data);
      return;
    default:
      return; // feature-name table (read above) and unknown extensions: nothing to do
  }
}

/** Opens the external data file named by the image. */
export async function openDataFile(layout: Qcow2Layout, ctx: OpenContext): Promise<BlockDevice | undefined> {
  if (layout.dataFileName === undefined) return undefined;
  return ctx.openRelated(layout.dataFileName);
}
