/**
 * QED (QEMU Enhanced Disk), read side: a 64-byte header in a header area of header_size clusters, one
 * L1 table, L2 tables on demand, data clusters; no refcounts, no compression, no snapshots. Opening
 * validates the header as QEMU does and walks every table once (QED tables are small next to the data
 * they map); invalid entries do not fail the open, so check() can count them, but mapping() and
 * hostSpace() refuse them.
 */
import { readExact, type BlockDevice } from '../../src/blockdev/types.js';
import type { CheckReport, FormatDriver, ImageInfo, ProbeInput, SourceImage } from '../../src/driver.js';
import { FormatError } from '../../src/errors.js';
import type { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import { checkQed } from './check.js';
import {
  QED,
  QED_AUTOCLEAR_FEATURE_MASK,
  QED_COMPAT_FEATURE_MASK,
  QED_HEADER_BYTES,
  QED_MAGIC,
  decodeBackingName,
  decodeHeader,
  validateHeader,
  type QedGeometry,
} from './header.js';
import { scanLayout, type QedLayout } from './layout.js';
import { qedTarget } from './target.js';
import type { Relocatable } from '../../src/driver.js';

class QedImage implements SourceImage {
  readonly format = QED;
  readonly dataDev: BlockDevice;

  constructor(
    readonly dev: BlockDevice,
    readonly info: ImageInfo,
    readonly geometry: QedGeometry,
    private readonly layout: QedLayout,
  ) {
    this.dataDev = dev;
  }

  /** The first invalid table entry, as the error every guest-facing view raises. */
  private refuseInvalid(): void {
    const { errors, errorCount } = this.layout;
    if (errorCount === 0) return;
    const e = errors[0]!;
    if (errorCount === 1) throw e;
    throw new FormatError(e.format, e.field, e.value, `${e.reason} (and ${errorCount - 1} more invalid table entries)`);
  }

  async mapping(): Promise<ExtentMap> {
    this.refuseInvalid();
    return this.layout.map;
  }

  async hostSpace(): Promise<HostSpace> {
    this.refuseInvalid();
    const g = this.geometry;
    const hs = new HostSpace(QED, g.fileSize);
    hs.add(0, g.headerBytes, 'header', 'QED header area');
    hs.add(g.l1TableOffset, g.tableBytes, 'metadata', 'L1 table');
    for (const t of this.layout.l2Tables) hs.add(t.offset, g.tableBytes, 'metadata', 'L2 table');
    hs.addMapping(this.layout.map);
    // A data cluster is whole on the host even where the virtual size ends inside it.
    const tail = g.virtualSize % g.clusterSize;
    const last = this.layout.map.count > 0 ? this.layout.map.at(this.layout.map.count - 1) : undefined;
    if (tail !== 0 && last?.kind === 'data') hs.add(last.host! + last.length, g.clusterSize - tail, 'data', 'data cluster tail past the virtual size');
    for (const r of this.layout.dataPastEnd) hs.add(r.start, r.length, 'data', 'data cluster past the virtual size');
    // Validate now: a cluster two L2 entries share is refused here, not later in a caller.
    hs.finish();
    return hs;
  }

  check(): Promise<CheckReport> {
    return checkQed(this.dev, this.geometry);
  }

  get relocationAlignment(): number {
    return this.geometry.clusterSize;
  }

  /** Data clusters (pointer: an L2 entry), L2 tables (an L1 entry), the L1 table (the header field). */
  async relocatable(level: number, minHost: number): Promise<Relocatable[]> {
    this.refuseInvalid();
    const g = this.geometry;
    const u64 = (v: number) => {
      const b = new Uint8Array(8);
      new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
      return b;
    };
    const ends = (host: number, length: number) => host + length > minHost;
    if (level === 2) {
      return ends(g.l1TableOffset, g.tableBytes) ? [{ host: g.l1TableOffset, length: g.tableBytes, level, pointer: { offset: QED_L1_OFFSET_FIELD, encode: u64 } }] : [];
    }
    if (level === 1) {
      return this.layout.l2Tables
        .filter((t) => ends(t.offset, g.tableBytes))
        .map((t) => ({ host: t.offset, length: g.tableBytes, level, pointer: { offset: g.l1TableOffset + t.l1Index * 8, encode: u64 } }));
    }
    if (level !== 0) return [];
    const l2At = new Map(this.layout.l2Tables.map((t) => [t.l1Index, t.offset]));
    const out: Relocatable[] = [];
    const cs = g.clusterSize;
    for (const e of this.layout.map) {
      if (e.kind !== 'data' || e.host! + e.length + cs <= minHost) continue;
      for (let off = 0; off < e.length; off += cs) {
        const host = e.host! + off;
        if (!ends(host, cs)) continue;
        const guest = e.guest + off;
        const l2 = l2At.get(Math.floor(guest / g.l2Span))!;
        const index = Math.floor((guest % g.l2Span) / cs);
        out.push({ host, length: cs, level: 0, guest, pointer: { offset: l2 + index * 8, encode: u64 } });
      }
    }
    return out;
  }

  async close(): Promise<void> {}
}

function hexBits(v: bigint): string {
  return `0x${v.toString(16)}`;
}

/** A u64 feature word for `details`: a number when exact, else hex. */
function featureWord(v: bigint): number | string {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : hexBits(v);
}

function describe(g: QedGeometry, layout: QedLayout, backingName: string | undefined): ImageInfo {
  const h = g.header;
  const features: string[] = [];
  if (backingName !== undefined) features.push(g.backingNoProbe ? 'backing file (raw, not probed)' : 'backing file');
  if (layout.zeroClusters > 0) features.push('zero clusters');
  if (g.needCheck) features.push('needs check (not closed cleanly)');
  const unknownCompat = h.compatFeatures & ~QED_COMPAT_FEATURE_MASK;
  if (unknownCompat) features.push(`unknown compatible features ${hexBits(unknownCompat)} (ignored, as QEMU does)`);
  const unknownAutoclear = h.autoclearFeatures & ~QED_AUTOCLEAR_FEATURE_MASK;
  if (unknownAutoclear) features.push(`unknown autoclear features ${hexBits(unknownAutoclear)} (QEMU clears them on a read-write open)`);
  return {
    format: QED,
    virtualSize: g.virtualSize,
    clusterSize: g.clusterSize,
    ...(backingName !== undefined ? { backing: { filename: backingName, ...(g.backingNoProbe ? { format: 'raw' } : {}) } } : {}),
    dirty: g.needCheck,
    corrupt: false,
    features,
    details: {
      'cluster-size': g.clusterSize,
      'table-size': g.tableSize,
      'header-size': g.headerSize,
      features: featureWord(h.features),
      'compat-features': featureWord(h.compatFeatures),
      'autoclear-features': featureWord(h.autoclearFeatures),
      'need-check': g.needCheck,
      'backing-format-no-probe': g.backingNoProbe,
      'l1-table-offset': g.l1TableOffset,
      'table-entries': g.tableEntries,
      'l2-tables': layout.l2Tables.length,
      'data-clusters': layout.dataClusters,
      'zero-clusters': layout.zeroClusters,
    },
  };
}

/** Byte offset of l1_table_offset in the header (qed.h QEDHeader). */
const QED_L1_OFFSET_FIELD = 40;

export const qedDriver: FormatDriver = {
  name: QED,
  target: qedTarget,
  description: 'QED (QEMU Enhanced Disk): header, L1/L2 tables, little-endian',

  /** bdrv_qed_probe: a whole header with the magic. */
  probe(input: ProbeInput): number {
    if (input.head.length < QED_HEADER_BYTES) return 0;
    return Buffer.from(input.head.subarray(0, 4)).toString('latin1') === QED_MAGIC ? 100 : 0;
  },

  async open(dev: BlockDevice): Promise<SourceImage> {
    const fileSize = await dev.size();
    const raw = await readExact(dev, 0, Math.min(QED_HEADER_BYTES, fileSize), () => new FormatError(QED, 'header', fileSize, 'file ends early'));
    const g = validateHeader(decodeHeader(raw), fileSize);
    let backingName: string | undefined;
    if (g.hasBacking && g.header.backingFilenameSize > 0) {
      const h = g.header;
      // Inside the header area, which lies below the L1 table and so inside the file.
      const bytes = await readExact(dev, h.backingFilenameOffset, h.backingFilenameSize, () =>
        new FormatError(QED, 'backing_filename_offset', h.backingFilenameOffset, 'the name runs past the end of the file'),
      );
      backingName = decodeBackingName(bytes) || undefined;
    }
    const layout = await scanLayout(dev, g);
    return new QedImage(dev, describe(g, layout, backingName), g, layout);
  },
};
