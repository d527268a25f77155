/**
 * qcow2 (versions 2 and 3): probe, open with every header field validated, the active layer's
 * guest → host mapping, the host-space map of every structure, and a qemu-img-style refcount check.
 */
import { inflateRawSync, constants as zc } from 'node:zlib';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import type { CheckReport, FormatDriver, ImageInfo, OpenContext, SourceImage } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import type { Extent, ExtentMap } from '../../src/extent-map.js';
import type { HostSpace } from '../../src/host-space.js';
import { checkQcow2 } from './check.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  CRYPT_NONE,
  FORMAT,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  QCOW2_MAGIC,
} from './header.js';
import { buildHostSpace } from './hostspace.js';
import { openDataFile, readLayout, type Qcow2Layout } from './open.js';
import { activeMapping, dropL2Tables, forEachL2, keepL2Tables, l1EntryL2Offset } from './tables.js';
import { qcow2Target } from './target.js';
import { qcow2Stream } from './stream.js';

class Qcow2Image implements SourceImage {
  readonly format = FORMAT;
  readonly dataFile?: string;
  private map: ExtentMap | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly dataDev: BlockDevice,
    readonly info: ImageInfo,
    private readonly layout: Qcow2Layout,
  ) {
    if (layout.dataFileName !== undefined) this.dataFile = layout.dataFileName;
  }

  private get encrypted(): boolean {
    return this.layout.header.cryptMethod !== CRYPT_NONE;
  }

  async mapping(): Promise<ExtentMap> {
    if (this.encrypted) {
      // Data clusters hold ciphertext (LUKS IVs even depend on the host offset): no usable mapping.
      throw new UnsupportedError(FORMAT, 'encryption', `crypt_method ${this.layout.header.cryptMethod}: guest data is encrypted`);
    }
    this.map ??= await activeMapping(this.layout);
    return this.map;
  }

  async hostSpace(): Promise<HostSpace> {
    try {
      return await buildHostSpace(this.layout);
    } finally {
      // The last scan of an analysis (open, mapping, host space): later scans read the file again.
      dropL2Tables(this.layout);
    }
  }

  check(): Promise<CheckReport> {
    return checkQcow2(this.layout);
  }

  /** One compressed cluster, inflated as QEMU does (raw deflate, exactly one cluster of output). */
  async readCompressed(extent: Extent): Promise<Uint8Array> {
    const cs = this.layout.clusterSize;
    if (this.layout.header.compressionType === COMPRESSION_ZSTD) {
      throw new UnsupportedError(FORMAT, 'zstd compression', 'Node has no zstd decoder; convert with qemu-img to zlib first');
    }
    const payload = await readAt(this.dev, extent.host!, extent.hostLength!);
    let out: Buffer;
    try {
      // The payload is rounded up to whole sectors, so it may end mid-stream or carry trailing bytes:
      // QEMU accepts any stream that yields a full cluster (qcow2_zlib_decompress).
      out = inflateRawSync(payload, { maxOutputLength: cs, finishFlush: zc.Z_SYNC_FLUSH });
    } catch (e) {
      throw new FormatError(FORMAT, 'compressed cluster', extent.host, `does not inflate to one ${cs}-byte cluster: ${(e as Error).message}`);
    }
    if (out.length !== cs) {
      throw new FormatError(FORMAT, 'compressed cluster', extent.host, `inflates to ${out.length} bytes, not one ${cs}-byte cluster`);
    }
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }

  async close(): Promise<void> {
    dropL2Tables(this.layout);
    if (this.dataDev !== this.dev) await this.dataDev.close();
  }
}

/**
 * Whether the active tables use zero or compressed clusters, for info's feature list. A lenient
 * scan: malformed entries are left for mapping() and check() to report.
 */
async function scanClusterKinds(layout: Qcow2Layout): Promise<{ zero: boolean; compressed: boolean }> {
  const found = { zero: false, compressed: false };
  const { l1Size, l1TableOffset } = layout.header;
  const l1Bytes = await readAt(layout.dev, l1TableOffset, l1Size * 8);
  const l1 = new DataView(l1Bytes.buffer);
  const step = layout.l2EntryBytes;
  const extended = layout.extendedL2;
  const done = () => found.zero && found.compressed;
  await forEachL2(
    layout,
    l1Size,
    (i) => {
      if (done()) return 0; // both found: the remaining tables need not be read
      try {
        return l1EntryL2Offset(layout, l1, i, 'L1');
      } catch {
        return 0;
      }
    },
    (_i, _offset, table) => {
      if (!table || done()) return;
      // Byte tests on the big-endian entries: bit 62 (compressed) is in the first byte, bit 0 (zero) in
      // the eighth; an extended entry's zero bitmap is its third u32.
      const b = new Uint8Array(table.buffer, table.byteOffset, table.byteLength);
      for (let at = 0; at < layout.l2Entries * step && !done(); at += step) {
        if ((b[at]! & 0x40) !== 0) found.compressed = true;
        else if (extended ? (b[at + 8]! | b[at + 9]! | b[at + 10]! | b[at + 11]!) !== 0 : (b[at + 7]! & 1) !== 0) found.zero = true;
      }
    },
  );
  return found;
}

async function describe(layout: Qcow2Layout): Promise<ImageInfo> {
  const h = layout.header;
  const lazy = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  const dataFileRaw = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  const kinds = await scanClusterKinds(layout);
  const features: string[] = [];
  if (kinds.zero) features.push('zero clusters');
  if (kinds.compressed) features.push('compressed clusters');
  if (layout.snapshots.length) features.push(`${layout.snapshots.length} internal snapshot${layout.snapshots.length === 1 ? '' : 's'}`);
  if (layout.bitmaps) features.push(`${layout.bitmaps.nbBitmaps} bitmap${layout.bitmaps.nbBitmaps === 1 ? '' : 's'}`);
  if (layout.staleBitmaps) features.push('inconsistent bitmaps (ignored)');
  if (lazy) features.push('lazy refcounts');
  if (layout.extendedL2) features.push('extended L2');
  if (layout.dataFileName !== undefined) features.push(dataFileRaw ? 'external data file (raw)' : 'external data file');
  if (h.cryptMethod !== CRYPT_NONE) features.push(`encryption (${h.cryptMethod === 1 ? 'aes' : 'luks'})`);
  const details: ImageInfo['details'] = {
    compat: h.version >= 3 ? '1.1' : '0.10',
    'compression-type': h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
    'lazy-refcounts': lazy,
    'refcount-bits': 1 << h.refcountOrder,
    corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
    'extended-l2': layout.extendedL2,
    'data-file': layout.dataFileName ?? null,
    'data-file-raw': dataFileRaw,
    'cluster-size': layout.clusterSize,
    'header-length': h.headerLength,
    'l1-size': h.l1Size,
    'refcount-table-clusters': h.refcountTableClusters,
    snapshots: layout.snapshots.length,
    bitmaps: layout.bitmaps?.nbBitmaps ?? 0,
    // Only meaningful with a bitmaps extension: QEMU ignores the bitmaps when autoclear bit 0 is clear.
    'bitmaps-consistent': layout.bitmaps || layout.staleBitmaps ? (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n : null,
    encrypt: h.cryptMethod === CRYPT_NONE ? null : h.cryptMethod === 1 ? 'aes' : 'luks',
  };
  const info: ImageInfo = {
    format: FORMAT,
    subformat: h.version >= 3 ? 'v3' : 'v2',
    virtualSize: layout.virtualSize,
    clusterSize: layout.clusterSize,
    dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
    features,
    details,
  };
  // What a conversion (which carries only the active guest mapping) would lose.
  const notCarried: NonNullable<ImageInfo['notCarried']> = [];
  if (layout.snapshots.length) {
    notCarried.push({ feature: 'internal snapshots', action: 'refuse', detail: `${layout.snapshots.length} internal snapshot(s) hold guest data outside the active layer; export or delete them first (qemu-img snapshot -l / -d)` });
  }
  if (h.cryptMethod !== CRYPT_NONE) notCarried.push({ feature: 'encryption', action: 'refuse', detail: 'the data is encrypted; decrypt with qemu-img convert first' });
  if (layout.bitmaps) notCarried.push({ feature: 'dirty bitmaps', action: 'drop', detail: `${layout.bitmaps.nbBitmaps} persistent dirty bitmap(s) (incremental-backup state) are not carried` });
  if (notCarried.length) info.notCarried = notCarried;
  if (layout.backingFile !== undefined) {
    info.backing = { filename: layout.backingFile, ...(layout.backingFormat !== undefined ? { format: layout.backingFormat } : {}) };
  }
  return info;
}

export const qcow2Driver: FormatDriver = {
  name: FORMAT,
  description: 'QEMU copy-on-write v2/v3 (qcow2)',
  target: qcow2Target,
  stream: qcow2Stream,
  probe({ head }) {
    if (head.length < 8) return 0;
    const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
    if (dv.getUint32(0) !== QCOW2_MAGIC) return 0;
    const version = dv.getUint32(4);
    return version === 2 || version === 3 ? 100 : 0;
  },
  async open(dev: BlockDevice, ctx: OpenContext): Promise<SourceImage> {
    const layout = await readLayout(dev);
    keepL2Tables(layout);
    const info = await describe(layout);
    const dataDev = (await openDataFile(layout, ctx)) ?? dev;
    return new Qcow2Image(dev, dataDev, info, layout);
  },
};
