/**
 * Descriptor files (the image file is text naming extents). imgconv reads one shape: a single RW
 * FLAT (or VMFS) extent — monolithicFlat, and any other createType whose descriptor lists exactly
 * that — where guest byte x is byte offset·512 + x of the extent file. Holes of the extent file
 * (SEEK_DATA/SEEK_HOLE, as drivers/raw) are zero runs with their host offset. Everything else (split
 * sparse, several extents, seSparse, vmfsSparse) is refused with a hint. QEMU: vmdk_open_desc_file,
 * vmdk_parse_extents.
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { BackingRef, CheckReport, ImageInfo, OpenContext, SourceImage } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import { carriedFromDescriptor, ddbValue, NO_PARENT_CID, type Descriptor, type DescriptorExtent } from './descriptor.js';
import { FORMAT, SECTOR } from './header.js';
import { checkParentCid } from './sparse.js';

/** The createTypes QEMU opens from a descriptor file (monolithicSparse/streamOptimized only via a header). */
const QEMU_DESCRIPTOR_TYPES = new Set(['monolithicFlat', 'vmfs', 'vmfsSparse', 'seSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']);

export class FlatImage implements SourceImage {
  readonly format = FORMAT;
  private map: ExtentMap | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly dataDev: BlockDevice,
    readonly dataFile: string,
    readonly info: ImageInfo,
    readonly descriptor: Descriptor,
    private readonly descriptorSize: number,
    /** Byte offset of guest 0 in the extent file. */
    private readonly base: number,
  ) {}

  async mapping(): Promise<ExtentMap> {
    if (this.map) return this.map;
    const size = this.info.virtualSize;
    const fileSize = await this.dataDev.size();
    const map = new ExtentMap(size);
    // The extent is one data run, as QEMU reports it (src/map.ts marks its file holes zero:true);
    // beyond the extent file's end, reads give zeros (QEMU's file layer).
    const inFile = Math.max(0, Math.min(size, fileSize - this.base));
    if (inFile > 0) map.push({ guest: 0, length: inFile, kind: 'data', host: this.base });
    map.fillTo(size, 'zero');
    return (this.map = map);
  }

  /** The image file is the descriptor: all of it is a fixed header. Data lives in dataDev. */
  async hostSpace(): Promise<HostSpace> {
    const hs = new HostSpace(FORMAT, this.descriptorSize);
    hs.add(0, this.descriptorSize, 'header', 'descriptor');
    return hs;
  }

  async check(): Promise<CheckReport> {
    const messages: string[] = [];
    const fileSize = await this.dataDev.size();
    // QEMU vmdk_co_check: the extent's start must lie inside the extent file.
    if (this.info.virtualSize > 0 && this.base >= fileSize) {
      messages.push(`ERROR extent offset ${this.base} of ${JSON.stringify(this.dataFile)} points after its end (${fileSize} bytes)`);
    }
    return { format: FORMAT, corruptions: messages.length, leaks: 0, checkErrors: 0, messages, imageEndOffset: this.descriptorSize };
  }

  async close(): Promise<void> {
    await this.dataDev.close();
  }
}

function refuse(createType: string, why: string): never {
  throw new UnsupportedError(FORMAT, `createType "${createType}"`, `${why}; convert it first with \`qemu-img convert -O vmdk -o subformat=monolithicSparse\` (or -O raw)`);
}

export async function openDescriptorFile(dev: BlockDevice, ctx: OpenContext, d: Descriptor, fileSize: number): Promise<FlatImage> {
  const createType = d.createType!;
  if (!QEMU_DESCRIPTOR_TYPES.has(createType)) {
    if (createType === 'monolithicSparse' || createType === 'streamOptimized') {
      throw new FormatError(FORMAT, 'createType', createType, 'a descriptor file cannot describe this type: its extent is a sparse file with a header, open that file instead');
    }
    refuse(createType, 'imgconv reads only single-extent flat descriptor files');
  }
  const rw: DescriptorExtent[] = [];
  for (const e of d.extents) {
    if (e.access !== 'RW') refuse(createType, `extent ${JSON.stringify(e.file ?? e.type)} has access ${e.access} (QEMU skips such extents, which changes the disk size)`);
    rw.push(e);
  }
  if (rw.length === 0) throw new FormatError(FORMAT, 'descriptor extents', 0, 'no extent line');
  if (rw.length > 1) refuse(createType, `${rw.length} extents (imgconv reads one data file per image)`);
  const e = rw[0]!;
  if (e.type !== 'FLAT' && e.type !== 'VMFS') refuse(createType, `extent type ${e.type}`);
  if (e.file === undefined) throw new FormatError(FORMAT, 'extent file', null, `${e.type} extent without a file name`);
  if (e.sectors <= 0) throw new FormatError(FORMAT, 'extent sectors', e.sectors, 'an extent must have at least one sector');
  // QEMU: FLAT needs its OFFSET, VMFS must not have one.
  if (e.type === 'FLAT' && e.offset === undefined) throw new FormatError(FORMAT, 'extent offset', null, `FLAT extent "${e.file}" without an offset`);
  if (e.type === 'VMFS' && e.offset !== undefined) throw new FormatError(FORMAT, 'extent offset', e.offset, `VMFS extent "${e.file}" must not have an offset`);
  const base = (e.offset ?? 0) * SECTOR;
  const virtualSize = e.sectors * SECTOR;
  let backing: BackingRef | undefined;
  if (d.parentFileNameHint !== undefined && d.parentCid !== NO_PARENT_CID) {
    backing = { filename: d.parentFileNameHint, format: 'vmdk' };
    await checkParentCid(ctx, d);
  }
  const dataDev = await ctx.openRelated(e.file);
  const geometry = [ddbValue(d, 'ddb.geometry.cylinders'), ddbValue(d, 'ddb.geometry.heads'), ddbValue(d, 'ddb.geometry.sectors')];
  const info: ImageInfo = {
    format: FORMAT,
    subformat: createType,
    virtualSize,
    carried: carriedFromDescriptor(d),
    ...(backing ? { backing } : {}),
    dirty: false,
    corrupt: false,
    features: ['flat extent'],
    details: {
      version: d.version,
      cid: d.cid,
      'parent-cid': d.parentCid,
      'create-type': createType,
      'adapter-type': ddbValue(d, 'ddb.adapterType') ?? null,
      'hw-version': ddbValue(d, 'ddb.virtualHWVersion') ?? null,
      geometry: geometry.every((x) => x !== undefined) ? geometry.join('/') : null,
      compressed: false,
      'zeroed-grain': false,
      'extent-file': e.file,
      'extent-offset': base,
    },
  };
  return new FlatImage(dev, dataDev, e.file, info, d, fileSize, base);
}
