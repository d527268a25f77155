/**
 * Hosted sparse extents in one file: monolithicSparse (version 1, or 2 with zeroed grains) and
 * streamOptimized (version 3, deflated grains behind markers, possibly with the real header in a
 * footer). QEMU: vmdk_open_vmdk4, get_cluster_offset, vmdk_read_extent, vmdk_co_check.
 */
import { inflateSync } from 'node:zlib';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import type { BackingRef, CheckReport, ImageInfo, OpenContext, Relocatable, SourceImage } from '../../src/driver.js';
import { FormatError, ImgconvError, IoError, isMissingFile, UnsupportedError } from '../../src/errors.js';
import type { Extent, ExtentMap } from '../../src/extent-map.js';
import { HostSpace, type HostRole } from '../../src/host-space.js';
import { carriedFromDescriptor, ddbValue, decodeDescriptor, NO_PARENT_CID, type Descriptor } from './descriptor.js';
import {
  decodeSparseHeader,
  FLAG_RGD,
  FORMAT,
  GD_AT_END,
  HEADER_BYTES,
  SECTOR,
  validateSparseHeader,
  VMDK4_MAGIC,
  type SparseExtentHeader,
  type SparseGeometry,
} from './header.js';
import { decodeMetadataMarker, isMetadataMarker, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT } from './markers.js';
import { readU32Table, walkGrainDirectory, type TableRange, type WalkResult } from './tables.js';

/** Footer marker, footer header, end-of-stream marker: the last 1536 bytes of a GD_AT_END file. */
const FOOTER_BYTES = 3 * SECTOR;

interface Footer {
  /** Offset of the footer marker sector. */
  at: number;
  header: SparseExtentHeader;
}

/** For GD_AT_END: the footer QEMU reads at total_sectors·512 − 1536, with its sanity checks. */
async function readFooter(dev: BlockDevice, fileSize: number): Promise<Footer> {
  const end = Math.ceil(fileSize / SECTOR) * SECTOR;
  if (end < HEADER_BYTES + FOOTER_BYTES) {
    throw new FormatError(FORMAT, 'gdOffset', GD_AT_END, `GD_AT_END, but the file (${fileSize} bytes) is too short for a footer`);
  }
  const at = end - FOOTER_BYTES;
  const buf = await readAt(dev, at, FOOTER_BYTES);
  const footerMarker = decodeMetadataMarker(buf.subarray(0, SECTOR));
  const header = decodeSparseHeader(buf.subarray(SECTOR, 2 * SECTOR));
  const eos = decodeMetadataMarker(buf.subarray(2 * SECTOR));
  if (footerMarker.size !== 0 || footerMarker.type !== MARKER_FOOTER) {
    throw new FormatError(FORMAT, 'footer marker', `size ${footerMarker.size} type ${footerMarker.type}`, `invalid footer at ${at}: expected a footer marker (size 0, type ${MARKER_FOOTER})`);
  }
  if (header.magic !== VMDK4_MAGIC) throw new FormatError(FORMAT, 'footer magic', header.magic, `invalid footer at ${at + SECTOR}: not "KDMV"`);
  if (eos.numSectors !== 0n || eos.size !== 0 || eos.type !== MARKER_EOS) {
    throw new FormatError(FORMAT, 'end-of-stream marker', `value ${eos.numSectors} size ${eos.size} type ${eos.type}`, 'invalid footer: the last sector is not an end-of-stream marker');
  }
  return { at, header };
}

function cidHex(n: number): string {
  return n.toString(16).padStart(8, '0');
}

export class SparseImage implements SourceImage {
  readonly format = FORMAT;
  readonly dataDev: BlockDevice;
  private walked: WalkResult | undefined;
  private space: HostSpace | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly info: ImageInfo,
    readonly geometry: SparseGeometry,
    readonly descriptor: Descriptor | undefined,
    private readonly fileSize: number,
    private readonly gd: Uint32Array,
    private readonly footer: Footer | undefined,
  ) {
    this.dataDev = dev;
  }

  private async walk(): Promise<WalkResult> {
    return (this.walked ??= await walkGrainDirectory(this.dev, this.geometry, this.gd, this.fileSize, true));
  }

  async mapping(): Promise<ExtentMap> {
    const w = await this.walk();
    if (w.problems.length > 0) {
      this.walked = undefined; // a later check() walks again without stopping
      throw w.problems[0]!;
    }
    return w.map;
  }

  /** The redundant GD and its grain tables: kept for hostSpace (QEMU only writes through them). */
  private async redundantTables(problems: FormatError[] | undefined): Promise<TableRange[]> {
    const g = this.geometry;
    if (g.rgdOffset === undefined) return [];
    const out: TableRange[] = [{ start: g.rgdOffset, length: g.gdEntries * 4, what: 'redundant grain directory' }];
    const rgd = await readU32Table(this.dev, g.rgdOffset, g.gdEntries);
    for (let i = 0; i < rgd.length; i++) {
      if (rgd[i] === 0) continue;
      const at = rgd[i]! * SECTOR;
      if (at + g.gtBytes > this.fileSize) {
        const e = new FormatError(FORMAT, `redundant grain directory entry ${i}`, rgd[i], `its grain table runs past the end of the file (${this.fileSize} bytes)`);
        if (!problems) throw e;
        problems.push(e);
        continue;
      }
      out.push({ start: at, length: g.gtBytes, what: 'redundant grain table' });
    }
    return out;
  }

  private async buildHostSpace(w: WalkResult, problems?: FormatError[]): Promise<HostSpace> {
    const g = this.geometry;
    const hs = new HostSpace(FORMAT, this.fileSize);
    let end = 0;
    const add = (start: number, length: number, role: HostRole, what: string) => {
      hs.add(start, length, role, what);
      end = Math.max(end, start + length);
    };
    add(0, HEADER_BYTES, 'header', 'header');
    if (g.descriptorOffset !== undefined) add(g.descriptorOffset, g.descriptorLength, 'header', 'embedded descriptor');
    for (const t of await this.redundantTables(problems)) add(t.start, t.length, 'metadata', t.what);
    add(g.gdOffset, g.gdEntries * 4, 'metadata', 'grain directory');
    for (const t of w.tables) add(t.start, t.length, 'metadata', t.what);
    if (g.markers) {
      // Marker sectors in front of the GD and of each GT (VMware's stream layout; QEMU writes none).
      const before = async (at: number, type: number, what: string) => {
        if (at < SECTOR * 2) return;
        const sector = await readAt(this.dev, at - SECTOR, SECTOR);
        if (isMetadataMarker(sector, type)) add(at - SECTOR, SECTOR, 'metadata', what);
      };
      await before(g.gdOffset, MARKER_GD, 'grain directory marker');
      for (const t of w.tables) if (t.what === 'grain table') await before(t.start, MARKER_GT, 'grain table marker');
    }
    hs.addMapping(w.map);
    for (const e of w.map) if (e.host !== undefined) end = Math.max(end, e.host + (e.kind === 'compressed' ? e.hostLength ?? 0 : e.length));
    if (this.footer) {
      add(this.footer.at, SECTOR, 'metadata', 'footer marker');
      add(this.footer.at + SECTOR, SECTOR, 'metadata', 'footer');
      add(this.footer.at + 2 * SECTOR, SECTOR, 'metadata', 'end-of-stream marker');
    } else if (g.markers && this.fileSize % SECTOR === 0 && this.fileSize >= 2 * SECTOR) {
      // A trailing end-of-stream marker after everything else (VMware streams end with one).
      const lastAt = this.fileSize - SECTOR;
      if (lastAt >= end) {
        const last = await readAt(this.dev, lastAt, SECTOR);
        if (last.every((b) => b === 0)) add(lastAt, SECTOR, 'metadata', 'end-of-stream marker');
      }
    }
    return hs;
  }

  async hostSpace(): Promise<HostSpace> {
    if (this.space) return this.space;
    const w = await this.walk();
    if (w.problems.length > 0) {
      this.walked = undefined;
      throw w.problems[0]!;
    }
    const hs = await this.buildHostSpace(w);
    hs.finish();
    return (this.space = hs);
  }

  async check(): Promise<CheckReport> {
    const messages: string[] = [];
    let corruptions = 0;
    const w = await walkGrainDirectory(this.dev, this.geometry, this.gd, this.fileSize, false);
    const problems = [...w.problems];
    let hs: HostSpace | undefined;
    try {
      hs = await this.buildHostSpace(w, problems);
      hs.finish();
    } catch (e) {
      if (!(e instanceof ImgconvError)) throw e;
      problems.push(e as FormatError);
      hs = undefined;
    }
    for (const p of problems) {
      corruptions++;
      messages.push(`ERROR ${p.message}`);
    }
    for (const m of w.lbaMismatches) {
      corruptions++;
      messages.push(`ERROR ${m}`);
    }
    const g = this.geometry;
    return {
      format: FORMAT,
      corruptions,
      leaks: 0,
      checkErrors: 0,
      messages,
      imageEndOffset: hs ? Math.max(this.fileSize, hs.usedEnd()) : this.fileSize,
      totalClusters: Math.ceil(g.virtualSize / g.grainBytes),
      allocatedClusters: w.dataGrains + w.compressedGrains,
      compressedClusters: w.compressedGrains,
    };
  }

  /** Inflates one compressed grain (zlib format: QEMU's vmdk uses compress/uncompress). */
  async readCompressed(extent: Extent): Promise<Uint8Array> {
    const g = this.geometry;
    const host = extent.host;
    const size = extent.hostLength;
    if (host === undefined || size === undefined || size <= 0 || size > 2 * g.grainBytes || host + size > this.fileSize) {
      throw new FormatError(FORMAT, 'compressed grain', host ?? null, 'not a compressed grain of this image');
    }
    const grainStart = extent.guest - (extent.guest % g.grainBytes);
    const needed = Math.min(g.grainBytes, g.virtualSize - grainStart);
    const payload = await readAt(this.dev, host, size);
    let out: Uint8Array;
    try {
      out = inflateSync(payload, { maxOutputLength: g.grainBytes });
    } catch (e) {
      throw new FormatError(FORMAT, 'compressed grain', host, `does not inflate to at most one grain (${g.grainBytes} bytes): ${(e as Error).message}`);
    }
    if (out.length < needed) {
      throw new FormatError(FORMAT, 'compressed grain', host, `inflates to ${out.length} bytes, less than the ${needed} bytes of its grain`);
    }
    const grain = new Uint8Array(g.grainBytes);
    grain.set(out.subarray(0, g.grainBytes));
    return grain;
  }

  /** Grains are addressed by sector. */
  readonly relocationAlignment = SECTOR;

  /**
   * Level 0 only: every uncompressed grain, with its grain table entry (and the redundant table's entry
   * as the mirror). The tables themselves are not offered: relocation pins them, since their one pointer
   * is in the grain directory and the directory's in the header.
   */
  async relocatable(level: number, minHost: number): Promise<Relocatable[]> {
    if (level !== 0) return [];
    const g = this.geometry;
    if (g.compressed) return [];
    const map = await this.mapping();
    const rgd = g.rgdOffset !== undefined ? await readU32Table(this.dev, g.rgdOffset, g.gdEntries) : undefined;
    const sector = (v: number) => {
      // A grain table entry is a 32-bit sector number: a place at or past 2 TiB would wrap to another
      // sector, and the grain's old place is punched once the pointer is flushed.
      if (v / SECTOR > 0xffffffff) throw new UnsupportedError('vmdk', 'file size', `a grain cannot be moved to byte ${v}: VMDK grain table entries reach 2 TiB`);
      const b = new Uint8Array(4);
      new DataView(b.buffer).setUint32(0, v / SECTOR, true);
      return b;
    };
    const out: Relocatable[] = [];
    for (const e of map) {
      if (e.kind !== 'data') continue;
      for (let guest = e.guest; guest < e.guest + e.length; guest += g.grainBytes) {
        const host = e.host! + (guest - e.guest);
        if (host + g.grainBytes <= minHost) continue;
        const grain = Math.floor(guest / g.grainBytes);
        const gdIndex = Math.floor(grain / g.gtesPerGt);
        const inTable = (grain % g.gtesPerGt) * 4;
        const mirrorTable = rgd?.[gdIndex];
        out.push({
          host,
          length: g.grainBytes,
          level: 0,
          guest,
          pointer: { offset: this.gd[gdIndex]! * SECTOR + inTable, encode: sector, ...(mirrorTable ? { mirror: mirrorTable * SECTOR + inTable } : {}) },
        });
      }
    }
    return out;
  }

  async close(): Promise<void> {}
}

/** Reads the CID of a VMDK file (sparse or descriptor) for the parent check; undefined if not VMDK. */
export async function readCid(dev: BlockDevice): Promise<number | undefined> {
  const size = await dev.size();
  const head = await readAt(dev, 0, Math.min(size, HEADER_BYTES));
  if (head.length >= HEADER_BYTES && new DataView(head.buffer, head.byteOffset).getUint32(0, true) === VMDK4_MAGIC) {
    const h = decodeSparseHeader(head);
    // QEMU reads 20 sectors from byte 0x200 whatever descriptorOffset says; imgconv follows the header.
    const at = h.descriptorOffset !== 0n && h.descriptorOffset < 1n << 32n ? Number(h.descriptorOffset) * SECTOR : SECTOR;
    const sectors = h.descriptorOffset !== 0n && h.descriptorSize > 0n && h.descriptorSize <= 2048n ? Number(h.descriptorSize) : 20;
    const d = decodeDescriptor(await readAt(dev, at, sectors * SECTOR), { requireCreateType: false });
    return d.cid;
  }
  if (size > 1 << 20) return undefined;
  const text = await readAt(dev, 0, size);
  try {
    return decodeDescriptor(text).cid;
  } catch {
    return undefined;
  }
}

export async function openSparse(dev: BlockDevice, ctx: OpenContext, fileSize: number): Promise<SparseImage> {
  if (fileSize < HEADER_BYTES) throw new FormatError(FORMAT, 'file size', fileSize, 'shorter than the 512-byte sparse extent header');
  const first = decodeSparseHeader(await readAt(dev, 0, HEADER_BYTES));
  let header = first;
  let footer: Footer | undefined;
  if (first.gdOffset === GD_AT_END) {
    footer = await readFooter(dev, fileSize);
    header = footer.header;
  }
  const g = validateSparseHeader(header, fileSize);
  if (footer && (g.gdOffset + g.gdEntries * 4 > footer.at || (g.rgdOffset !== undefined && g.rgdOffset + g.gdEntries * 4 > footer.at))) {
    throw new FormatError(FORMAT, 'gdOffset', header.gdOffset, 'the grain directory overlaps the footer');
  }
  let descriptor: Descriptor | undefined;
  if (g.descriptorOffset !== undefined && g.descriptorLength > 0) {
    descriptor = decodeDescriptor(await readAt(dev, g.descriptorOffset, g.descriptorLength), { requireCreateType: false });
  }
  const gd = await readU32Table(dev, g.gdOffset, g.gdEntries);
  const createType = g.compressed ? 'streamOptimized' : 'monolithicSparse';

  let backing: BackingRef | undefined;
  if (descriptor?.parentFileNameHint !== undefined && descriptor.parentCid !== NO_PARENT_CID) {
    backing = { filename: descriptor.parentFileNameHint, format: 'vmdk' };
    await checkParentCid(ctx, descriptor);
  }
  const features: string[] = [];
  if (g.zeroedGrain) features.push('zeroed grains');
  if (g.compressed) features.push('compressed grains');
  if (g.markers) features.push('markers');
  if ((g.flags & FLAG_RGD) !== 0) features.push('redundant grain directory');
  if (footer) features.push('footer (GD at end)');
  const geometry = [ddbValue(descriptor, 'ddb.geometry.cylinders'), ddbValue(descriptor, 'ddb.geometry.heads'), ddbValue(descriptor, 'ddb.geometry.sectors')];
  const info: ImageInfo = {
    format: FORMAT,
    subformat: createType,
    virtualSize: g.virtualSize,
    clusterSize: g.grainBytes,
    carried: carriedFromDescriptor(descriptor),
    ...(backing ? { backing } : {}),
    dirty: g.dirty,
    corrupt: false,
    features,
    details: {
      version: g.version,
      cid: descriptor?.cid ?? null,
      'parent-cid': descriptor?.parentCid ?? null,
      'create-type': createType,
      'descriptor-create-type': descriptor?.createType ?? null,
      'adapter-type': ddbValue(descriptor, 'ddb.adapterType') ?? null,
      'hw-version': ddbValue(descriptor, 'ddb.virtualHWVersion') ?? null,
      geometry: geometry.every((x) => x !== undefined) ? geometry.join('/') : null,
      compressed: g.compressed,
      'zeroed-grain': g.zeroedGrain,
      'grain-sectors': g.grainSectors,
      'gtes-per-gt': g.gtesPerGt,
      'unclean-shutdown': g.dirty,
    },
  };
  return new SparseImage(dev, info, g, descriptor, fileSize, gd, footer);
}

/**
 * QEMU (vmdk_is_cid_valid) refuses to read through a parent that is not a VMDK or whose CID is not
 * our parentCID. imgconv checks it at open: a chain whose link is broken would read stale data.
 * A parent that cannot be opened is left for the chain opener to report.
 */
export async function checkParentCid(ctx: OpenContext, d: Descriptor): Promise<void> {
  let parent: BlockDevice;
  try {
    parent = await ctx.openRelated(d.parentFileNameHint!);
  } catch (e) {
    // Missing: the chain opener reports it. Any other failure to open it is reported here: skipping the
    // check on a transient error would let the chain read through a parent nobody checked.
    if (e instanceof IoError && !isMissingFile(e)) throw e;
    return;
  }
  try {
    let cid: number | undefined;
    try {
      cid = await readCid(parent);
    } catch (e) {
      if (!(e instanceof ImgconvError) || e instanceof IoError) throw e;
      cid = undefined;
    }
    if (cid === undefined) {
      throw new FormatError(FORMAT, 'parentFileNameHint', d.parentFileNameHint, 'the parent is not a VMDK image with a readable CID (QEMU refuses to read through it)');
    }
    if (cid !== d.parentCid) {
      throw new FormatError(FORMAT, 'parentCID', cidHex(d.parentCid), `the parent ${JSON.stringify(d.parentFileNameHint)} has CID ${cidHex(cid)}: it changed since this delta was made (QEMU refuses to read through it)`);
    }
  } finally {
    await parent.close();
  }
}
