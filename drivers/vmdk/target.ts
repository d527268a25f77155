/**
 * VMDK monolithicSparse as a conversion target: a sparse extent header at sector 0, the embedded
 * descriptor in sectors 1–20, a grain directory and every grain table in allocated space, and each
 * grain table entry pointing at the sector where the grain's data already lies.
 *
 * Grains are sector-addressed [QEMU get_cluster_offset]: a grain may start on any 512-byte boundary,
 * but its bytes must be contiguous on the host. So, unlike qcow2 and QED, data does not have to be
 * grain-aligned to stay; `grainize` below is this format's version of clusterize (which demands
 * cluster-aligned hosts): a grain stays when its guest bytes are one data run whose host start is a
 * sector boundary, outside the header and descriptor.
 *
 * Layout choices, after QEMU's vmdk_init_extent / vmdk_co_do_create:
 * - The descriptor starts at sector 1 and owns 20 sectors (DESC_SIZE), NUL-padded. QEMU reads CID and
 *   parentCID from byte 0x200, 20 sectors, whatever descriptorOffset says; and on the first write after
 *   each open, vmdk_write_cid reads those 20 sectors and writes them all back with the last byte (file
 *   byte 10751) set to NUL. A shorter descriptor region would let that rewrite clobber a grain, so the
 *   fixed region is QEMU's whole header + descriptor area, [0, 10752).
 * - Every grain table is allocated: QEMU's get_cluster_offset answers "unallocated" for a zero grain
 *   directory entry even when writing, so a missing table would make its guest range unwritable.
 * - No redundant grain directory (QEMU writes one; the flag says whether it is used, and nothing reads
 *   it but QEMU's own writes through it): half the tables to write.
 * - Version 1, as QEMU makes by default; version 2 with the zeroed-grain flag when zero runs must stay
 *   explicit (over a parent, where an unallocated grain would read the parent) or when asked
 *   (zeroed_grain=on). Without a parent, zero runs read zeros as unallocated grains.
 * - All offsets are 32-bit sector numbers: the file must end below 2 TiB (VMDK_EXTENT_MAX_SECTORS).
 *
 * VMDK has no refcounts and QEMU's vmdk check counts no leaks: the old format's structures become
 * unreferenced space that reclaim punches out; no compaction.
 */
import { createHash } from 'node:crypto';
import { basename } from 'node:path';
import { alignUp } from '../../src/binary.js';
import type { Allocator, CarriedField, HostWrite, ImageInfo, PlanInput, TargetBuild, TargetDriver, TargetPlan } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import { cheapestClusterSize, clusterize, powersOfTwo, type ClusterRun, type MustMove } from '../../src/engine/clusters.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import type { ExtentMap } from '../../src/extent-map.js';
import { canonicalToVmdkUuid, encodeDescriptor, NO_PARENT_CID, type Descriptor } from './descriptor.js';
import {
  COMPRESSION_NONE,
  encodeSparseHeader,
  FLAG_NL_DETECT,
  FLAG_ZERO_GRAIN,
  FORMAT,
  HEADER_BYTES,
  MAX_GD_ENTRIES,
  MAX_SECTOR_FIELD,
  SECTOR,
  VMDK4_MAGIC,
} from './header.js';
import { GTE_ZEROED } from './tables.js';

/** QEMU's DESC_SIZE: the descriptor area it reads (and rewrites) from byte 0x200. */
export const DESCRIPTOR_SECTORS = 20;
/** Header sector + descriptor area: what the target owns at fixed offsets. */
export const FIXED_BYTES = HEADER_BYTES + DESCRIPTOR_SECTORS * SECTOR;
export const GTES_PER_GT = 512;
export const GT_BYTES = GTES_PER_GT * 4;
/** Every offset must be a 32-bit sector number. */
export const MAX_FILE_BYTES = MAX_SECTOR_FIELD * SECTOR;

const DEFAULT_GRAIN = 65536;
/**
 * QEMU takes a grain of one sector, but VMware's format note asks for "a power of 2 greater than 8"
 * sectors and VirtualBox refuses fewer than 8 (vmdkReadMetaExtent: "invalid extent grain size"). Data
 * stays put at any grain size (grains are sector-addressed), so 4 KiB costs nothing but tables.
 */
const MIN_GRAIN = 8 * SECTOR;
/**
 * QEMU accepts grains up to 1 GiB, but it copies or zeroes a whole grain on the first write to it;
 * beyond 1 MiB that only costs the guest, and no source needs more to keep its data in place.
 */
const MAX_GRAIN = 1 << 20;

const SUBFORMAT = 'monolithicSparse';
const KNOWN_OPTIONS = ['subformat', 'zeroed_grain', 'adapter_type', 'hwversion', 'toolsversion', 'compat6', 'descriptor'];
const FLAT = 'monolithicFlat';
/** qemu-img create options this in-place writer does not do: refused by name rather than ignored. */
const REFUSED_OPTIONS: Record<string, string> = {
  backing_file: 'changing the backing file',
  backing_fmt: 'changing the backing format',
  size: 'resizing',
};
/** QEMU's other subformats, and why they are not made in place (yet). */
const REFUSED_SUBFORMATS: Record<string, string> = {
  twoGbMaxExtentSparse: 'it splits the disk into 2 GiB extent files',
  twoGbMaxExtentFlat: 'it splits the disk into 2 GiB extent files',
  streamOptimized: 'every grain would be compressed: nothing could stay in place',
};
/** QEMU's BlockdevVmdkAdapterType. */
const ADAPTER_TYPES = ['ide', 'buslogic', 'lsilogic', 'legacyESX'];

/**
 * Facts plan() needs that PlanInput does not carry (the engine is asked to pass them): the image's
 * path, whose basename goes on the extent line, and the backing file as its own driver opened it —
 * a VMDK delta must record its parent's CID (QEMU vmdk_is_cid_valid refuses to read through a parent
 * whose CID differs, or that is not a VMDK).
 */
export interface VmdkPlanInput extends PlanInput {
  path?: string;
  backingInfo?: ImageInfo;
}

/** Extent name used when the engine does not say what the image is called. */
const FALLBACK_EXTENT_NAME = 'disk.vmdk';

export interface VmdkOptions {
  /** monolithicFlat: the image becomes the raw extent of a descriptor file created beside it. */
  flat?: boolean;
  /** The descriptor's file name (monolithicFlat), relative to the image's directory. */
  descriptor?: string;
  zeroedGrain?: boolean;
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
}

function optionError(name: string, value: string, why: string): UsageError {
  return new UsageError(`-o ${name}=${value}: ${why}`);
}

function parseBool(name: string, v: string): boolean {
  const s = v.trim().toLowerCase();
  if (s === 'on' || s === 'true' || s === 'yes') return true;
  if (s === 'off' || s === 'false' || s === 'no') return false;
  throw optionError(name, v, 'must be on or off');
}

/** The user's -o options, validated. `zeroedGrain` is undefined unless given. */
export function parseVmdkOptions(options: Record<string, string>): VmdkOptions {
  for (const k of Object.keys(options)) {
    const refused = REFUSED_OPTIONS[k];
    if (refused) throw new UsageError(`vmdk option "${k}" is not supported by in-place conversion (${refused})`);
    if (!KNOWN_OPTIONS.includes(k)) throw new UsageError(`vmdk has no option "${k}" (known: ${KNOWN_OPTIONS.join(', ')})`);
  }
  if (options.subformat !== undefined) {
    const s = options.subformat.trim();
    const why = REFUSED_SUBFORMATS[s];
    if (why) throw optionError('subformat', options.subformat, `in-place conversion makes only ${SUBFORMAT}; ${s}: ${why}`);
    if (s !== SUBFORMAT && s !== FLAT) {
      throw optionError('subformat', options.subformat, `unknown subformat (QEMU's are ${[SUBFORMAT, FLAT, ...Object.keys(REFUSED_SUBFORMATS)].join(', ')})`);
    }
  }
  const out: VmdkOptions = { adapterType: 'ide', hwVersion: '4', toolsVersion: '2147483647' };
  if (options.subformat?.trim() === FLAT) out.flat = true;
  if (options.descriptor !== undefined) {
    const d = options.descriptor.trim();
    // eslint-disable-next-line no-control-regex
    if (!out.flat) throw optionError('descriptor', options.descriptor, `only monolithicFlat has a separate descriptor file (add -o subformat=${FLAT})`);
    if (d === '' || d.includes('/') || /["\x00-\x1f\x7f]/.test(d)) throw optionError('descriptor', options.descriptor, 'must be a plain file name (no directory, quotes or control characters)');
    out.descriptor = d;
  }
  if (options.zeroed_grain !== undefined) out.zeroedGrain = parseBool('zeroed_grain', options.zeroed_grain);
  if (options.adapter_type !== undefined) {
    const a = options.adapter_type.trim();
    if (!ADAPTER_TYPES.includes(a)) throw optionError('adapter_type', options.adapter_type, `must be one of ${ADAPTER_TYPES.join(', ')}`);
    out.adapterType = a;
  }
  const hw = options.hwversion?.trim();
  if (hw !== undefined && hw !== 'undefined') {
    if (!/^\d{1,3}$/.test(hw)) throw optionError('hwversion', options.hwversion!, 'must be a virtual hardware version number (e.g. 4, 6, 21)');
    out.hwVersion = hw;
  }
  if (options.compat6 !== undefined && parseBool('compat6', options.compat6)) {
    if (hw !== undefined && hw !== 'undefined') throw optionError('compat6', options.compat6, 'compat6 cannot be enabled with hwversion set');
    out.hwVersion = '6';
  }
  if (options.toolsversion !== undefined) {
    const t = options.toolsversion.trim();
    if (!/^\d{1,10}$/.test(t)) throw optionError('toolsversion', options.toolsversion, 'must be a number');
    out.toolsVersion = t;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Grain analysis: which grains can point at their data where it lies.

export interface HostRange {
  start: number;
  length: number;
}

export interface Grainized {
  grainSize: number;
  /** Guest-ordered runs of whole grains (but for a partial last grain): data runs with their host. */
  runs: ClusterRun[];
  mustMove: MustMove[];
  moveBytes: number;
}

/**
 * clusterize (src/engine/clusters.ts) for sector-addressed grains: a grain stays as data when its guest
 * bytes are one data run (host-contiguous, as ExtentMap merges) starting on a sector boundary, and its
 * host bytes miss the reserved header area.
 */
export function grainize(map: ExtentMap, gs: number, opts: { reserved: HostRange[]; hasBacking: boolean }): Grainized {
  const c = clusterize(map, gs, { ...opts, hostAlignment: SECTOR });
  return { grainSize: gs, runs: c.runs, mustMove: c.mustMove, moveBytes: c.moveBytes };
}

// ---------------------------------------------------------------------------------------------------
// Layout: grain directory and grain tables, from the allocator.

export function gdEntriesFor(gs: number, virtualSize: number): number {
  return Math.ceil(virtualSize / (gs * GTES_PER_GT));
}

function gdBytesFor(entries: number): number {
  return alignUp(entries * 4, SECTOR);
}

/** Header, descriptor area, grain directory and every grain table. */
export function metadataBytesFor(gs: number, virtualSize: number): number {
  const n = gdEntriesFor(gs, virtualSize);
  return FIXED_BYTES + gdBytesFor(n) + n * GT_BYTES;
}

interface Layout {
  gdOffset: number;
  gtOffsets: number[];
}

function layOut(gdEntries: number, alloc: Allocator): Layout {
  const gdOffset = alloc.alloc(gdBytesFor(gdEntries), SECTOR);
  const gtOffsets: number[] = [];
  for (let i = 0; i < gdEntries; i++) gtOffsets.push(alloc.alloc(GT_BYTES, SECTOR));
  return { gdOffset, gtOffsets };
}

/** Where the last byte of a data run's grains can be (grain starts must be 32-bit sectors). */
function dataEnd(runs: ClusterRun[]): number {
  let end = 0;
  for (const r of runs) if (r.kind === 'data') end = Math.max(end, r.host! + r.length);
  return end;
}

/** The end of the grain directory and of the last grain table. */
function tablesEnd(layout: Layout, gdEntries: number): number {
  let end = layout.gdOffset + gdBytesFor(gdEntries);
  for (const o of layout.gtOffsets) end = Math.max(end, o + GT_BYTES);
  return end;
}

/** The committed file length: every structure and grain inside, whole sectors. */
function finalLengthOf(alloc: Allocator, runs: ClusterRun[], layout: Layout): number {
  return alignUp(Math.max(alloc.end, dataEnd(runs), FIXED_BYTES, tablesEnd(layout, layout.gtOffsets.length)), SECTOR);
}

function refuseBeyondLimit(end: number): void {
  if (end > MAX_FILE_BYTES) {
    throw new UnsupportedError(
      FORMAT,
      'file size',
      `the converted file would end at ${end} bytes, beyond the 2 TiB that VMDK's 32-bit sector offsets reach (QEMU VMDK_EXTENT_MAX_SECTORS)`,
    );
  }
}

// ---------------------------------------------------------------------------------------------------
// Descriptor and header.

interface DescriptorFields {
  /** Carried from the source: ddb.uuid.image, and the geometry ("C/H/S") in place of the computed one. */
  uuid?: string;
  geometry?: string;
  cid: number;
  parentCid: number;
  parentHint?: string;
  capacitySectors: number;
  extentName: string;
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
  virtualSize: number;
}

/**
 * The disk database both descriptors carry, as QEMU's vmdk_co_do_create writes it: geometry computed
 * from the size (or the source's, carried), adapter, versions, and the source's UUID when it had one.
 */
function diskDatabase(f: { adapterType: string; hwVersion: string; toolsVersion: string; virtualSize: number; uuid?: string; geometry?: string }): [string, string][] {
  const heads = f.adapterType === 'ide' ? 16 : 255;
  const [cyl, hd, sec] = f.geometry?.split('/') ?? [String(Math.floor(f.virtualSize / (63 * heads * SECTOR))), String(heads), '63'];
  return [
    ['ddb.virtualHWVersion', f.hwVersion],
    ['ddb.geometry.cylinders', cyl!],
    ['ddb.geometry.heads', hd!],
    ['ddb.geometry.sectors', sec!],
    ['ddb.adapterType', f.adapterType],
    ['ddb.toolsVersion', f.toolsVersion],
    ...(f.uuid ? ([['ddb.uuid.image', canonicalToVmdkUuid(f.uuid)]] as [string, string][]) : []),
  ];
}

/** The descriptor QEMU's vmdk_co_do_create writes, NUL-padded to the 20-sector area. */
export function encodeEmbeddedDescriptor(f: DescriptorFields): Uint8Array {
  const d: Descriptor = {
    version: 1,
    cid: f.cid,
    parentCid: f.parentCid,
    createType: SUBFORMAT,
    extents: [{ access: 'RW', sectors: f.capacitySectors, type: 'SPARSE', file: f.extentName }],
    ddb: diskDatabase(f),
    other: [],
  };
  if (f.parentHint !== undefined) d.parentFileNameHint = f.parentHint;
  const text = Buffer.from(encodeDescriptor(d), 'utf8');
  const area = new Uint8Array(DESCRIPTOR_SECTORS * SECTOR);
  // Room for the terminating NUL: QEMU strstr()s the area as a C string.
  if (text.length >= area.length) {
    throw new UnsupportedError(FORMAT, 'descriptor', `${text.length} bytes do not fit in the ${area.length - 1} bytes QEMU reads (a file name is too long)`);
  }
  area.set(text, 0);
  return area;
}

/**
 * The extent line names the image itself; characters the line cannot hold become '_'. QEMU finds the
 * parent by strstr(descriptor, "parentFileNameHint"), so a name containing that word is not written.
 */
function extentNameOf(path: string | undefined): string {
  if (path === undefined) return FALLBACK_EXTENT_NAME;
  // eslint-disable-next-line no-control-regex
  const name = basename(path).replace(/["\x00-\x1f\x7f]/g, '_');
  return name === '' || name.includes('parentFileNameHint') ? FALLBACK_EXTENT_NAME : name;
}

/** A CID derived from the content's layout: deterministic (plan() is pure), never "no parent". */
function contentId(input: PlanInput): number {
  const h = createHash('sha256');
  h.update(`${input.info.virtualSize}:${input.fileSize}:`);
  for (const e of input.mapping) h.update(`${e.guest},${e.length},${e.kind},${e.host ?? ''};`);
  const cid = h.digest().readUInt32LE(0);
  return cid === NO_PARENT_CID ? 0xfffffffe : cid;
}

function hex(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

// ---------------------------------------------------------------------------------------------------
// Parent.

/** The parent's CID, or a refusal saying why this parent cannot be carried. */
function parentCidOf(input: VmdkPlanInput): number | undefined {
  const backing = input.info.backing;
  if (!backing) return undefined;
  const rebase = `rebase the image first with \`qemu-img rebase\` (onto a VMDK parent, or -b "" to flatten it into a standalone image)`;
  const name = backing.filename;
  // eslint-disable-next-line no-control-regex
  if (/["\x00-\x1f\x7f]/.test(name) || Buffer.byteLength(name, 'utf8') >= 4096) {
    throw new UnsupportedError(FORMAT, 'backing file name', `${JSON.stringify(name)} cannot be written as parentFileNameHint (quotes, control characters or 4 KiB and more); ${rebase}`);
  }
  const format = input.backingInfo?.format ?? backing.format;
  if (format !== undefined && format !== FORMAT) {
    throw new UnsupportedError(
      FORMAT,
      `${format} parent`,
      `a VMDK can only have a VMDK parent (QEMU reads through no other), and ${JSON.stringify(name)} is ${format}; ${rebase}`,
    );
  }
  const cid = input.backingInfo?.details.cid;
  if (typeof cid !== 'number') {
    throw new UnsupportedError(
      FORMAT,
      'parent',
      `a VMDK delta must record its parent's CID, and the CID of ${JSON.stringify(name)} is not known to this conversion; ${rebase}`,
    );
  }
  return cid;
}

// ---------------------------------------------------------------------------------------------------
// The target.

interface Params {
  grainSize: number;
  version: 1 | 2;
  zeroedGrain: boolean;
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
  cid: number;
  parentCid: number;
  extentName: string;
}

function paramsOf(plan: TargetPlan): Params {
  const q = plan.parameters;
  return {
    grainSize: q.grain_size as number,
    version: q.version === 2 ? 2 : 1,
    zeroedGrain: q.zeroed_grain === true,
    adapterType: q.adapter_type as string,
    hwVersion: q.hwversion as string,
    toolsVersion: q.toolsversion as string,
    cid: parseInt(q.cid as string, 16),
    parentCid: q.parent_cid === undefined ? NO_PARENT_CID : parseInt(q.parent_cid as string, 16),
    extentName: q.extent as string,
  };
}

interface Candidate extends Grainized {
  cs: number;
  version: 1 | 2;
  metadataBytes: number;
}

const reservedRegion: HostRange[] = [{ start: 0, length: FIXED_BYTES }];

/**
 * The descriptor's name beside `image`: QEMU names a flat pair X.vmdk + X-flat.vmdk, so an image called
 * X-flat.* gets X.vmdk; any other gets its own stem + .vmdk, or stem-descriptor.vmdk when that is the image.
 */
export function flatDescriptorName(image: string): string {
  const base = basename(image);
  const stem = base.includes('.') ? base.slice(0, base.lastIndexOf('.')) : base;
  const name = `${stem.endsWith('-flat') ? stem.slice(0, -5) : stem}.vmdk`;
  return name === base ? `${stem}-descriptor.vmdk` : name;
}

/** The descriptor of a monolithicFlat VMDK whose one extent is the image file, from its first byte. */
function flatDescriptor(f: { cid: number; extent: string; sectors: number; adapterType: string; hwVersion: string; toolsVersion: string; virtualSize: number; uuid?: string; geometry?: string }): Uint8Array {
  const d: Descriptor = {
    version: 1,
    cid: f.cid,
    parentCid: NO_PARENT_CID,
    createType: FLAT,
    extents: [{ access: 'RW', sectors: f.sectors, type: 'FLAT', file: f.extent, offset: 0 }],
    ddb: diskDatabase(f),
    other: [],
  };
  return Buffer.from(encodeDescriptor(d), 'utf8');
}

/**
 * The source's identity where a descriptor has a place for it (the engine lists the rest as dropped):
 * its UUID, its adapter type unless -o adapter_type says otherwise (set into `opts`), its geometry.
 */
function carriedIdentity(input: PlanInput, opts: VmdkOptions): { kept: CarriedField[]; uuid?: string; geometry?: string } {
  const carried = input.info.carried ?? {};
  const kept: CarriedField[] = [];
  if (carried.uuid) kept.push('uuid');
  if (input.options.adapter_type === undefined && carried.adapterType && ADAPTER_TYPES.includes(carried.adapterType)) {
    opts.adapterType = carried.adapterType;
    kept.push('adapterType');
  }
  const geometry = carried.geometry && /^\d+\/\d+\/\d+$/.test(carried.geometry) ? carried.geometry : undefined;
  if (geometry) kept.push('geometry');
  return { kept, ...(carried.uuid ? { uuid: carried.uuid } : {}), ...(geometry ? { geometry } : {}) };
}

/**
 * monolithicFlat: a zero-copy layout for data at host = guest (raw, VHD fixed; other sources are
 * relocated there first). The image file becomes the flat extent, unchanged but for its length; the
 * descriptor is a new file beside it, created at the commit point.
 */
function planFlat(input: PlanInput, opts: VmdkOptions): TargetPlan {
  const { virtualSize, backing } = input.info;
  if (backing) {
    throw new UnsupportedError(FORMAT, 'backing file', `a monolithicFlat VMDK made in place has no parent, and this image reads part of its content from ${backing.filename}; flatten it first (qemu-img rebase -b ""), or make a monolithicSparse VMDK`);
  }
  if (virtualSize % SECTOR !== 0 || virtualSize === 0) throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is not a positive multiple of 512 (VMDK counts the capacity in sectors)`);
  if (input.path === undefined) throw new UsageError('monolithicFlat needs the image path (the descriptor names it)');
  const extent = basename(input.path);
  // eslint-disable-next-line no-control-regex
  if (/["\x00-\x1f\x7f]/.test(extent)) throw new UnsupportedError(FORMAT, 'extent file name', `${JSON.stringify(extent)}: a descriptor cannot name a file with quotes or control characters; rename the image first`);
  const descriptor = opts.descriptor ?? flatDescriptorName(input.path);
  const { kept, uuid, geometry } = carriedIdentity(input, opts);
  const fields = {
    cid: contentId(input),
    extent,
    sectors: virtualSize / SECTOR,
    adapterType: opts.adapterType,
    hwVersion: opts.hwVersion,
    toolsVersion: opts.toolsVersion,
    virtualSize,
    ...(uuid ? { uuid } : {}),
    ...(geometry ? { geometry } : {}),
  };
  return {
    format: FORMAT,
    parameters: {
      subformat: FLAT,
      descriptor,
      extent,
      adapter_type: fields.adapterType,
      hwversion: fields.hwVersion,
      toolsversion: fields.toolsVersion,
      cid: hex(fields.cid),
      ...(fields.uuid ? { uuid: fields.uuid } : {}),
      ...(geometry ? { geometry } : {}),
    },
    fixedRegions: [],
    mustMove: [],
    dataAlignment: SECTOR,
    placement: 'identity',
    companion: descriptor,
    dropped: [],
    kept,
    metadataBytes: flatDescriptor(fields).length,
  };
}

function buildFlat(plan: TargetPlan, input: PlanInput): TargetBuild {
  const q = plan.parameters;
  const bytes = flatDescriptor({
    cid: parseInt(q.cid as string, 16),
    extent: q.extent as string,
    sectors: input.info.virtualSize / SECTOR,
    adapterType: q.adapter_type as string,
    hwVersion: q.hwversion as string,
    toolsVersion: q.toolsversion as string,
    virtualSize: input.info.virtualSize,
    ...(q.uuid !== undefined ? { uuid: q.uuid as string } : {}),
    ...(q.geometry !== undefined ? { geometry: q.geometry as string } : {}),
  });
  return { writes: [], fixed: [], finalLength: input.info.virtualSize, metadataBytes: bytes.length, companion: bytes };
}

export const vmdkTarget: TargetDriver = {
  plan(input: PlanInput): TargetPlan {
    const vin = input as VmdkPlanInput;
    const opts = parseVmdkOptions(input.options);
    if (opts.flat) return planFlat(input, opts);
    const { virtualSize, backing } = input.info;
    if (virtualSize % SECTOR !== 0) {
      throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is not a multiple of 512 (VMDK counts the capacity in sectors)`);
    }
    if (virtualSize === 0) throw new UnsupportedError(FORMAT, 'virtual size', 'a sparse extent of capacity 0 is read as a descriptor of other extents');
    const parentCid = parentCidOf(vin);
    const hasBacking = backing !== undefined;
    const { kept, uuid, geometry } = carriedIdentity(input, opts);
    const descriptorFields = {
      ...(uuid ? { uuid } : {}),
      ...(geometry ? { geometry } : {}),
      cid: contentId(input),
      parentCid: parentCid ?? NO_PARENT_CID,
      ...(backing ? { parentHint: backing.filename } : {}),
      capacitySectors: virtualSize / SECTOR,
      extentName: extentNameOf(vin.path),
      adapterType: opts.adapterType,
      hwVersion: opts.hwVersion,
      toolsVersion: opts.toolsVersion,
      virtualSize,
    };
    encodeEmbeddedDescriptor(descriptorFields); // refuses a descriptor that does not fit

    const candidates: Candidate[] = [];
    for (const gs of powersOfTwo(MIN_GRAIN, MAX_GRAIN)) {
      if (gdEntriesFor(gs, virtualSize) > MAX_GD_ENTRIES) continue;
      const g = grainize(input.mapping, gs, { reserved: reservedRegion, hasBacking });
      const hasZeros = g.runs.some((r) => r.kind === 'zero');
      let mustMove = g.mustMove;
      const version: 1 | 2 = opts.zeroedGrain === true || (opts.zeroedGrain === undefined && hasBacking && hasZeros) ? 2 : 1;
      if (version === 1 && hasBacking && hasZeros) {
        // zeroed_grain=off over a parent: an unallocated grain would read the parent, so zeros are written.
        const zeros = g.runs.filter((r) => r.kind === 'zero').map((r) => ({ guest: r.guest, length: r.length, reason: 'zeroed_grain=off cannot mark zeros over a parent' }));
        mustMove = [...mustMove, ...zeros].sort((a, b) => a.guest - b.guest);
      }
      candidates.push({ ...g, cs: gs, mustMove, moveBytes: mustMove.reduce((s, m) => s + m.length, 0), version, metadataBytes: metadataBytesFor(gs, virtualSize) });
    }
    if (candidates.length === 0) throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes needs more than QEMU's ${MAX_GD_ENTRIES} grain directory entries`);
    const gs = cheapestClusterSize(candidates, DEFAULT_GRAIN, virtualSize);
    const chosen = candidates.find((c) => c.cs === gs)!;

    // Lay it out as the engine will (its allocator, moved data first) to know the file stays below 2 TiB.
    const alloc = new GapAllocator(input.hostSpace.free(), reservedRegion, Math.max(input.fileSize, input.hostSpace.usedEnd()));
    const moved: ClusterRun[] = chosen.mustMove.map((m) => ({ guest: m.guest, length: m.length, kind: 'data', host: alloc.alloc(m.length, gs) }));
    const layout = layOut(gdEntriesFor(gs, virtualSize), alloc);
    refuseBeyondLimit(finalLengthOf(alloc, [...chosen.runs, ...moved], layout));

    return {
      format: FORMAT,
      parameters: {
        subformat: SUBFORMAT,
        grain_size: gs,
        version: chosen.version,
        zeroed_grain: chosen.version === 2,
        adapter_type: opts.adapterType,
        hwversion: opts.hwVersion,
        toolsversion: opts.toolsVersion,
        cid: hex(descriptorFields.cid),
        ...(parentCid !== undefined ? { parent_cid: hex(parentCid) } : {}),
        extent: descriptorFields.extentName,
        ...(descriptorFields.uuid ? { uuid: descriptorFields.uuid } : {}),
        ...(descriptorFields.geometry ? { geometry: descriptorFields.geometry } : {}),
      },
      fixedRegions: [
        { start: 0, length: HEADER_BYTES, what: 'VMDK sparse extent header' },
        { start: HEADER_BYTES, length: DESCRIPTOR_SECTORS * SECTOR, what: 'VMDK embedded descriptor' },
      ],
      mustMove: chosen.mustMove,
      // Sector alignment is all a grain needs; grain alignment keeps moved data convertible in place
      // to a qcow2/QED of the same cluster size later.
      dataAlignment: gs,
      dropped: [],
      kept,
      metadataBytes: chosen.metadataBytes,
    };
  },

  build(plan: TargetPlan, input: PlanInput, alloc: Allocator): TargetBuild {
    if (plan.parameters.subformat === FLAT) return buildFlat(plan, input);
    const p = paramsOf(plan);
    const gs = p.grainSize;
    const { virtualSize, backing } = input.info;
    const hasBacking = backing !== undefined;
    const g = grainize(input.mapping, gs, { reserved: reservedRegion, hasBacking });
    if (g.mustMove.length) throw new Error(`vmdk build: ${g.mustMove.length} ranges still need moving (engine bug)`);
    if (p.version === 1 && hasBacking && g.runs.some((r) => r.kind === 'zero')) throw new Error('vmdk build: zero runs over a parent were not materialised (engine bug)');
    const gdEntries = gdEntriesFor(gs, virtualSize);
    const layout = layOut(gdEntries, alloc);
    const finalLength = finalLengthOf(alloc, g.runs, layout);
    refuseBeyondLimit(finalLength);

    // Grain tables: contiguous ones share one buffer (and one write).
    const chunks: { offset: number; bytes: Uint8Array }[] = [];
    /** Per grain table: the view of its chunk and its byte offset there. */
    const tableOf: { view: DataView; at: number }[] = [];
    {
      let k = 0;
      while (k < layout.gtOffsets.length) {
        let n = 1;
        while (k + n < layout.gtOffsets.length && layout.gtOffsets[k + n] === layout.gtOffsets[k]! + n * GT_BYTES) n++;
        const bytes = new Uint8Array(n * GT_BYTES);
        const view = new DataView(bytes.buffer);
        chunks.push({ offset: layout.gtOffsets[k]!, bytes });
        for (let j = 0; j < n; j++) tableOf.push({ view, at: j * GT_BYTES });
        k += n;
      }
    }
    let firstGrainSector = Infinity;
    const sectorsPerGrain = gs / SECTOR;
    for (const r of g.runs) {
      if (r.kind === 'unallocated' || (r.kind === 'zero' && !p.zeroedGrain)) continue;
      const first = r.guest / gs;
      const end = first + Math.ceil(r.length / gs);
      let value = r.kind === 'zero' ? GTE_ZEROED : r.host! / SECTOR;
      const step = r.kind === 'zero' ? 0 : sectorsPerGrain;
      if (r.kind === 'data') firstGrainSector = Math.min(firstGrainSector, value);
      // Table by table, so the inner loop is one store per grain.
      for (let grain = first; grain < end; ) {
        const t = tableOf[Math.floor(grain / GTES_PER_GT)]!;
        const stop = Math.min(end, (Math.floor(grain / GTES_PER_GT) + 1) * GTES_PER_GT);
        for (let at = t.at + (grain % GTES_PER_GT) * 4; grain < stop; grain++, at += 4, value += step) t.view.setUint32(at, value, true);
      }
    }
    const gd = new Uint8Array(gdBytesFor(gdEntries));
    const gdv = new DataView(gd.buffer);
    layout.gtOffsets.forEach((off, i) => gdv.setUint32(i * 4, off / SECTOR, true));

    // overHead: the sectors before the first grain (QEMU's grain_offset; it only checks that the file
    // is at least that long). With no data, the metadata's end.
    const overHead = Number.isFinite(firstGrainSector) ? firstGrainSector : Math.ceil(tablesEnd(layout, gdEntries) / SECTOR);
    const header = encodeSparseHeader({
      magic: VMDK4_MAGIC,
      version: p.version,
      flags: FLAG_NL_DETECT | (p.zeroedGrain ? FLAG_ZERO_GRAIN : 0),
      capacity: BigInt(virtualSize / SECTOR),
      grainSize: BigInt(gs / SECTOR),
      descriptorOffset: BigInt(HEADER_BYTES / SECTOR),
      descriptorSize: BigInt(DESCRIPTOR_SECTORS),
      numGTEsPerGT: GTES_PER_GT,
      rgdOffset: 0n,
      gdOffset: BigInt(layout.gdOffset / SECTOR),
      overHead: BigInt(overHead),
      uncleanShutdown: 0,
      singleEndLineChar: 0x0a,
      nonEndLineChar: 0x20,
      doubleEndLineChar1: 0x0d,
      doubleEndLineChar2: 0x0a,
      compressAlgorithm: COMPRESSION_NONE,
    });
    const descriptor = encodeEmbeddedDescriptor({
      ...(plan.parameters.uuid !== undefined ? { uuid: plan.parameters.uuid as string } : {}),
      ...(plan.parameters.geometry !== undefined ? { geometry: plan.parameters.geometry as string } : {}),
      cid: p.cid,
      parentCid: p.parentCid,
      ...(backing ? { parentHint: backing.filename } : {}),
      capacitySectors: virtualSize / SECTOR,
      extentName: p.extentName,
      adapterType: p.adapterType,
      hwVersion: p.hwVersion,
      toolsVersion: p.toolsVersion,
      virtualSize,
    });
    const writes: HostWrite[] = [{ offset: layout.gdOffset, bytes: gd }, ...chunks].sort((a, b) => a.offset - b.offset);
    return {
      writes,
      fixed: [
        { offset: 0, bytes: header },
        { offset: HEADER_BYTES, bytes: descriptor },
      ],
      finalLength,
      metadataBytes: FIXED_BYTES + gd.length + gdEntries * GT_BYTES,
    };
  },
};
