/**
 * VHD (QEMU "vpc") as a conversion target: dynamic (the default, as qemu-img's) or fixed.
 *
 * Dynamic layout, after QEMU's create_dynamic_disk: a copy of the footer at offset 0, the dynamic
 * header at 512, the BAT (big-endian u32 sector numbers, 0xFFFFFFFF = unallocated) in allocated space,
 * and per allocated 2 MiB block a 512-byte sector bitmap immediately followed by the block's data; the
 * footer again in the last 512 bytes of the file. The footer copy and the header are fixed regions;
 * the trailing footer is one too, placed past the end of everything once the layout is known.
 *
 * What stays and what moves. A block's data can stay where it lies only when its whole guest range is
 * one data run starting on a sector, and the sector right before it is free in the source (and outside
 * the fixed regions): the bitmap goes there, declared as `reserved` so nothing else is allocated there.
 * A partial last block (the disk is not a multiple of 2 MiB) still owns a whole block on the host, so
 * the rest of its block must be free too. That is rare — a raw disk has no free byte at all, and other
 * formats pack data clusters back to back — so nearly every block that holds data is copied
 * (`mustMove`, the whole block's guest range, data and zeros, with the bitmap sector as `movePrefix`).
 * Blocks that hold only zeros or unallocated space stay unallocated in the BAT (they read as zeros),
 * and file holes count as zeros here (`holesAsData` is false): a sparse raw disk's holes are not copied.
 * QEMU ignores the bitmap of a dynamic disk; it is written as QEMU writes it, all ones.
 *
 * Fixed layout: the guest bytes at their own offsets, then one 512-byte footer. That needs identity
 * placement (`placement: 'identity'`): the engine only accepts sources whose data already lies there
 * (raw: a zero-copy footer append) until it can relocate data.
 *
 * Virtual size: QEMU sizes a VHD by its CHS geometry unless the creator application is one whose
 * current_size it trusts, or the geometry is the maximum (vpc_open; geometry.ts `sizeSource`). The
 * size must come out exactly the source's, so: when the spec's geometry for the size multiplies out to
 * exactly the size, creator "qemu" with that geometry (what `qemu-img create` writes); otherwise creator
 * "qem2" with the maximum geometry 65535/16/255 and the exact current_size (what `qemu-img create -o
 * force_size=on` writes; QEMU up to 9.x trusts "qem2", and from 10.0 on any non-"qemu"/"vpc " creator,
 * and every version the maximum geometry). force_size=on takes the second form always. The size is
 * never rounded: it must be a multiple of 512 and at most 2040 GiB (QEMU's VHD_MAX_SECTORS).
 *
 * No differencing target: a source with a backing file is refused (rebase it or keep it as qcow2/QED).
 * No compaction: the old format's structures become space nothing references, which reclaim punches.
 */
import { createHash } from 'node:crypto';
import { alignUp } from '../../src/binary.js';
import type { Allocator, CarriedField, HostWrite, PlanInput, TargetBuild, TargetDriver, TargetOptions, TargetPlan } from '../../src/driver.js';
import { clusterize, type ClusterRun, type MustMove } from '../../src/engine/clusters.js';
import { IntervalSet } from '../../src/engine/intervals.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import type { ExtentMap } from '../../src/extent-map.js';
import type { FreeRange } from '../../src/host-space.js';
import {
  BAT_UNUSED,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_HEADER_SIZE,
  FEATURE_RESERVED,
  FOOTER_SIZE,
  FORMAT,
  VHD_EPOCH,
  VHD_VERSION,
  encodeDynHeader,
  encodeFooter,
  qemuBitmapSize,
} from './format.js';
import { CHS_MAX_C, CHS_MAX_H, CHS_MAX_S, VHD_MAX_SECTORS, VHD_SECTOR, geometryForSectors, geometrySectors, virtualSectors, type Geometry } from './geometry.js';

/** What QEMU creates (create_dynamic_disk); QEMU reads other powers of two, but offers no option. */
export const BLOCK_SIZE = 2 << 20;
/** 512 bytes: one bit per sector of a 2 MiB block, rounded up to a sector. */
export const BITMAP_SIZE = qemuBitmapSize(BLOCK_SIZE);
/** Footer copy and dynamic header: what a dynamic disk owns at fixed offsets. */
export const HEAD_BYTES = FOOTER_SIZE + DYN_HEADER_SIZE;
/** The largest disk QEMU opens (VHD_MAX_SECTORS, 2040 GiB). */
export const MAX_VIRTUAL_SIZE = VHD_MAX_SECTORS * VHD_SECTOR;
/** BAT entries are 32-bit sector numbers, and all ones means unallocated. */
export const MAX_BLOCK_SECTOR = BAT_UNUSED - 1;

/** QEMU's creator fields (vpc_co_create): Virtual PC 2007's version, "Wi2k". */
const CREATOR_VERSION = 0x00050003;
const CREATOR_OS = 'Wi2k';
const CREATOR_CHS = 'qemu';
const CREATOR_CURRENT_SIZE = 'qem2';
const MAX_GEOMETRY: Geometry = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };

const KNOWN_OPTIONS = ['subformat', 'force_size'];
const SUBFORMATS = ['dynamic', 'fixed'] as const;
export type VhdSubformat = (typeof SUBFORMATS)[number];

export interface VhdOptions {
  subformat: VhdSubformat;
  forceSize: boolean;
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

/** The user's -o options (qemu-img's vpc names), validated. */
export function parseVhdOptions(options: TargetOptions): VhdOptions {
  for (const k of Object.keys(options)) {
    if (!KNOWN_OPTIONS.includes(k)) throw new UsageError(`vhd (vpc) has no option "${k}" (known: ${KNOWN_OPTIONS.join(', ')})`);
  }
  let subformat: VhdSubformat = 'dynamic';
  if (options.subformat !== undefined) {
    const s = options.subformat.trim();
    if (!(SUBFORMATS as readonly string[]).includes(s)) throw optionError('subformat', options.subformat, `must be ${SUBFORMATS.join(' or ')}`);
    subformat = s as VhdSubformat;
  }
  const forceSize = options.force_size !== undefined ? parseBool('force_size', options.force_size) : false;
  return { subformat, forceSize };
}

// ---------------------------------------------------------------------------------------------------
// Size: geometry and creator application.

export interface SizeFields {
  geometry: Geometry;
  creatorApp: string;
}

/**
 * The geometry and creator application under which QEMU (and the read driver) compute exactly
 * `virtualSize`; refuses sizes a VHD cannot hold exactly.
 */
export function sizeFieldsFor(virtualSize: number, forceSize: boolean): SizeFields {
  if (virtualSize % VHD_SECTOR !== 0) {
    throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is not a multiple of 512 (a VHD counts its size in sectors); resize the disk to a whole number of sectors first`);
  }
  if (virtualSize > MAX_VIRTUAL_SIZE) {
    throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is above the ${MAX_VIRTUAL_SIZE} bytes (2040 GiB) a VHD can hold (QEMU VHD_MAX_SECTORS); keep it as qcow2, QED or VMDK`);
  }
  const sectors = virtualSize / VHD_SECTOR;
  const chs = geometryForSectors(sectors);
  const fields: SizeFields = !forceSize && geometrySectors(chs) === sectors ? { geometry: chs, creatorApp: CREATOR_CHS } : { geometry: MAX_GEOMETRY, creatorApp: CREATOR_CURRENT_SIZE };
  // The reader's rule is QEMU's: the size it will compute must be the source's, to the byte.
  const read = virtualSectors(fields.creatorApp, fields.geometry, BigInt(virtualSize));
  if (read !== BigInt(sectors)) throw new Error(`vhd target: geometry ${geometryText(fields.geometry)} under "${fields.creatorApp}" reads ${read} sectors, not ${sectors}`);
  return fields;
}

function geometryText(g: Geometry): string {
  return `${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`;
}

function parseGeometry(s: string): Geometry {
  const [cylinders, heads, sectorsPerTrack] = s.split('/').map(Number) as [number, number, number];
  return { cylinders, heads, sectorsPerTrack };
}

/** 16 random bytes as a version-4 UUID, or the source's own when it has one. */
/**
 * The source's own UUID when it has one; otherwise a version-4-shaped UUID derived from the image's
 * layout, so that `plan` shows the UUID `inplace` writes (plan() is pure) while two disks still differ.
 */
function uuidFor(carried: string | undefined, input: PlanInput): string {
  if (typeof carried === 'string' && /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(carried) && !/^[0-]+$/.test(carried)) return carried.toLowerCase();
  const h = createHash('sha256');
  h.update(`${input.path ?? ''}:${input.info.virtualSize}:${input.fileSize}:`);
  for (const e of input.mapping) h.update(`${e.guest},${e.length},${e.kind},${e.host ?? ''};`);
  const b = h.digest().subarray(0, 16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const x = b.toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

function uuidBytes(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/-/g, ''), 'hex'));
}

interface FooterFields {
  subformat: VhdSubformat;
  virtualSize: number;
  size: SizeFields;
  uuid: string;
  timestamp: number;
}

export function encodeTargetFooter(f: FooterFields): Uint8Array {
  return encodeFooter({
    features: FEATURE_RESERVED,
    version: VHD_VERSION,
    // QEMU and Microsoft's tools expect all 64 bits set in a fixed disk's data offset.
    dataOffset: f.subformat === 'dynamic' ? BigInt(FOOTER_SIZE) : 0xffffffffffffffffn,
    timestamp: f.timestamp,
    creatorApp: f.size.creatorApp,
    creatorVersion: CREATOR_VERSION,
    creatorOs: CREATOR_OS,
    originalSize: BigInt(f.virtualSize),
    currentSize: BigInt(f.virtualSize),
    geometry: f.size.geometry,
    diskType: f.subformat === 'dynamic' ? DISK_DYNAMIC : DISK_FIXED,
    uuid: uuidBytes(f.uuid),
    savedState: 0,
  });
}

// ---------------------------------------------------------------------------------------------------
// Block analysis: which blocks can keep their data where it lies.

/** Sorted free ranges with a containment query. */
class FreeIndex {
  private readonly starts: number[];
  constructor(private readonly free: FreeRange[]) {
    this.starts = free.map((f) => f.start);
  }
  /** Whether [start, start+length) lies inside one free range. */
  contains(start: number, length: number): boolean {
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid]! <= start) lo = mid + 1;
      else hi = mid;
    }
    const f = this.free[lo - 1];
    return f !== undefined && start + length <= f.start + f.length;
  }
}

/** The blocks of a mapping that hold data: each one data run (kept or not), or a range to move. */
interface DataBlocks {
  /** Blocks whose guest range is one sector-aligned data run: BAT index and the data's host offset. */
  runs: { block: number; host: number }[];
  /** Blocks that mix data with anything else, or hold compressed or unaligned data. */
  mustMove: MustMove[];
}

function moveOf(guest: number, vsize: number, reason: string): MustMove {
  const length = Math.min(BLOCK_SIZE, vsize - guest);
  // A partial last block still takes a whole block on the host (QEMU and the reader count it whole).
  return { guest, length, reason, ...(length < BLOCK_SIZE ? { hostLength: BLOCK_SIZE } : {}) };
}

/** Blocks wholly zero or unallocated are in neither list: they stay unallocated in the BAT. */
function dataBlocks(map: ExtentMap): DataBlocks {
  const vsize = map.virtualSize;
  const c = clusterize(map, BLOCK_SIZE, { hostAlignment: VHD_SECTOR });
  const mustMove: MustMove[] = [];
  for (const m of c.mustMove) for (let g = m.guest; g < m.guest + m.length; g += BLOCK_SIZE) mustMove.push(moveOf(g, vsize, m.reason));
  const runs: DataBlocks['runs'] = [];
  for (const r of c.runs as ClusterRun[]) {
    if (r.kind !== 'data') continue;
    for (let g = r.guest; g < r.guest + r.length; g += BLOCK_SIZE) runs.push({ block: g / BLOCK_SIZE, host: r.host! + (g - r.guest) });
  }
  return { runs, mustMove };
}

export interface BlockPlacement {
  /** Blocks whose data stays where it lies: BAT index and the data's host offset. */
  kept: { block: number; host: number }[];
  mustMove: MustMove[];
  /** The kept blocks' bitmap sectors that are free in the source (and a kept partial last block's unused rest). */
  reserved: FreeRange[];
  /**
   * Kept blocks' bitmap sectors that lie in the data of a block that moves: the source reads that data
   * there until the commit, so these bitmaps are fixed regions written at the commit point (undo and redo
   * in the journal), not pre-commit writes.
   */
  commitBitmaps: FreeRange[];
  /** Blocks that hold data, kept or moved. */
  allocated: number;
}

/**
 * How many bitmaps may be written at the commit point: each costs 512 bytes of undo and 512 of redo in
 * the journal (MAX_BINARY 256 MiB per record). 65536 keeps 128 GiB of data in place and the journal's
 * records at 32 MiB; past it the remaining blocks move as before.
 */
export const MAX_COMMIT_BITMAPS = 65536;

// Short: the journal records the reason of every moved block.
const BITMAP_IN_USE = 'no free sector before the block for its bitmap';
const BITMAP_IN_HEAD = 'the sector before the block is in the VHD header area';
const TAIL_IN_USE = 'the partial last block needs a whole free block on the host';
/** A fixed region's `what` for a bitmap written at the commit point (over moved data). */
const COMMIT_BITMAP = 'VHD block bitmap over moved data';

/**
 * Sorts the data blocks of `map` into kept in place and to move, given the source's free space.
 */
export function placeBlocks(map: ExtentMap, free: FreeRange[]): BlockPlacement {
  const vsize = map.virtualSize;
  const { runs, mustMove } = dataBlocks(map);
  const index = new FreeIndex(free);
  const kept: BlockPlacement['kept'] = [];
  /** Whole blocks whose only problem is the sector before them: candidates for a bitmap at the commit. */
  const blockedByBitmap: { block: number; host: number }[] = [];
  for (const r of runs) {
    const g = r.block * BLOCK_SIZE;
    const length = Math.min(BLOCK_SIZE, vsize - g);
    if (r.host - BITMAP_SIZE < HEAD_BYTES) mustMove.push(moveOf(g, vsize, BITMAP_IN_HEAD));
    else if (!index.contains(r.host - BITMAP_SIZE, BITMAP_SIZE)) {
      if (length === BLOCK_SIZE) blockedByBitmap.push(r);
      else mustMove.push(moveOf(g, vsize, BITMAP_IN_USE));
    } else if (length < BLOCK_SIZE && !index.contains(r.host + length, BLOCK_SIZE - length)) mustMove.push(moveOf(g, vsize, TAIL_IN_USE));
    else kept.push(r);
  }
  const commitBitmaps = keepOverMovedData(map, blockedByBitmap, kept, mustMove);
  // The rest of a kept partial last block is free space, and so is the bitmap sector of a kept block
  // whose data starts right after that block: both cannot be had, and the last block moves.
  const lastGuest = (batEntriesFor(vsize) - 1) * BLOCK_SIZE;
  const last = vsize % BLOCK_SIZE !== 0 ? kept.find((k) => k.block * BLOCK_SIZE === lastGuest) : undefined;
  if (last && kept.some((k) => k.host === last.host + BLOCK_SIZE)) {
    kept.splice(kept.indexOf(last), 1);
    mustMove.push(moveOf(lastGuest, vsize, TAIL_IN_USE));
  }
  const reserved: FreeRange[] = [];
  const atCommit = new Set(commitBitmaps.map((b) => b.start));
  for (const k of kept) {
    if (atCommit.has(k.host - BITMAP_SIZE)) continue;
    reserved.push({ start: k.host - BITMAP_SIZE, length: BITMAP_SIZE });
    if (k === last) reserved.push({ start: k.host + (vsize - lastGuest), length: BLOCK_SIZE - (vsize - lastGuest) });
  }
  reserved.sort((a, b) => a.start - b.start);
  mustMove.sort((a, b) => a.guest - b.guest);
  kept.sort((a, b) => a.block - b.block);
  return { kept, mustMove, reserved, commitBitmaps, allocated: kept.length + mustMove.length };
}

/**
 * Data packed back to back (a raw disk, a fixed VHD, clusters written in order) has no free sector
 * before any block, so every block would move. But once a block moves, its old place is free after the
 * commit: the block after it can stay, with its bitmap written at the commit point over the last sector
 * of the moved block's old data. Walking the candidates in host order and keeping every block whose
 * preceding sector lies in data that moves (the data of a block already decided to move) keeps about
 * every other block of a contiguous run: half the bytes moved and half the extra space of moving all.
 * Adds the blocks it keeps to `kept`, the rest to `mustMove`; returns the bitmaps to write at the commit.
 */
function keepOverMovedData(map: ExtentMap, candidates: { block: number; host: number }[], kept: BlockPlacement['kept'], mustMove: MustMove[]): FreeRange[] {
  const vsize = map.virtualSize;
  // Host ranges of the data of every block that moves (decided so far). A sector inside them is free
  // once the commit has pointed the BAT at the copies.
  const moving = new IntervalSet();
  const addMoving = (guest: number): void => {
    for (const e of map.range(guest, Math.min(BLOCK_SIZE, vsize - guest))) if (e.kind === 'data') moving.add(e.host!, e.length);
  };
  for (const m of mustMove) addMoving(m.guest);
  const bitmaps: FreeRange[] = [];
  for (const c of [...candidates].sort((a, b) => a.host - b.host)) {
    const at = c.host - BITMAP_SIZE;
    if (bitmaps.length < MAX_COMMIT_BITMAPS && moving.contains(at, BITMAP_SIZE)) {
      kept.push(c);
      bitmaps.push({ start: at, length: BITMAP_SIZE });
    } else {
      mustMove.push(moveOf(c.block * BLOCK_SIZE, vsize, BITMAP_IN_USE));
      addMoving(c.block * BLOCK_SIZE);
    }
  }
  return bitmaps;
}

export function batEntriesFor(virtualSize: number): number {
  return Math.ceil(virtualSize / BLOCK_SIZE);
}

export function batBytesFor(entries: number): number {
  return alignUp(entries * 4, VHD_SECTOR);
}

/** Footer copy, header, BAT, one bitmap per allocated block, trailing footer. */
export function dynamicMetadataBytes(virtualSize: number, allocatedBlocks: number): number {
  return HEAD_BYTES + batBytesFor(batEntriesFor(virtualSize)) + allocatedBlocks * BITMAP_SIZE + FOOTER_SIZE;
}

// ---------------------------------------------------------------------------------------------------
// The target.

function paramsOf(plan: TargetPlan, virtualSize: number): FooterFields {
  const q = plan.parameters;
  return {
    subformat: q.subformat as VhdSubformat,
    virtualSize,
    size: { geometry: parseGeometry(q.geometry as string), creatorApp: q.creator_app as string },
    uuid: q.uuid as string,
    timestamp: q.timestamp as number,
  };
}

function refuseBacking(input: PlanInput): void {
  const b = input.info.backing;
  if (!b) return;
  throw new UnsupportedError(
    FORMAT,
    'backing file',
    `the image reads from the backing file ${JSON.stringify(b.filename)}, and a VHD differencing target is not supported; make it standalone first (qemu-img rebase -b "" IMAGE), or convert to qcow2 or QED, which keep the backing file`,
  );
}

export const vhdTarget: TargetDriver = {
  holesAsData(options: TargetOptions): boolean {
    // Fixed: a hole is guest bytes at their own offset, exactly what the format wants.
    return parseVhdOptions(options).subformat === 'fixed';
  },

  plan(input: PlanInput): TargetPlan {
    const opts = parseVhdOptions(input.options);
    refuseBacking(input);
    const { virtualSize } = input.info;
    const size = sizeFieldsFor(virtualSize, opts.forceSize);
    const parameters: TargetPlan['parameters'] = {
      subformat: opts.subformat,
      ...(opts.subformat === 'dynamic' ? { block_size: BLOCK_SIZE } : {}),
      force_size: size.creatorApp === CREATOR_CURRENT_SIZE,
      creator_app: size.creatorApp,
      geometry: geometryText(size.geometry),
      uuid: uuidFor(input.info.carried?.uuid, input),
      timestamp: Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0,
    };
    // The source's identity that survives: its UUID; its geometry and creator only where the size rule
    // picks the same ones (they decide the virtual size QEMU reads).
    const carried = input.info.carried ?? {};
    const kept: CarriedField[] = [];
    if (carried.uuid && parameters.uuid === carried.uuid) kept.push('uuid');
    if (carried.geometry === parameters.geometry) kept.push('geometry');
    if (carried.creator !== undefined && carried.creator === String(parameters.creator_app).trim()) kept.push('creator');
    if (opts.subformat === 'fixed') {
      return {
        format: FORMAT,
        parameters,
        fixedRegions: [{ start: virtualSize, length: FOOTER_SIZE, what: 'VHD footer' }],
        mustMove: [],
        dataAlignment: VHD_SECTOR,
        placement: 'identity',
        dropped: [],
        kept,
        metadataBytes: FOOTER_SIZE,
      };
    }
    const placed = placeBlocks(input.mapping, input.hostSpace.free());
    return {
      format: FORMAT,
      parameters,
      fixedRegions: [
        { start: 0, length: FOOTER_SIZE, what: 'VHD footer copy' },
        { start: FOOTER_SIZE, length: DYN_HEADER_SIZE, what: 'VHD dynamic header' },
        ...placed.commitBitmaps.map((b) => ({ ...b, what: COMMIT_BITMAP })),
      ],
      mustMove: placed.mustMove,
      dataAlignment: VHD_SECTOR,
      movePrefix: BITMAP_SIZE,
      reserved: placed.reserved,
      dropped: [],
      kept,
      metadataBytes: dynamicMetadataBytes(virtualSize, placed.allocated),
    };
  },

  build(plan: TargetPlan, input: PlanInput, alloc: Allocator): TargetBuild {
    const { virtualSize } = input.info;
    const p = paramsOf(plan, virtualSize);
    const footer = encodeTargetFooter(p);
    if (p.subformat === 'fixed') {
      // Guest byte x at file byte x (the engine guarantees identity placement), then the footer.
      return { writes: [], fixed: [{ offset: virtualSize, bytes: footer }], finalLength: virtualSize + FOOTER_SIZE, metadataBytes: FOOTER_SIZE };
    }
    // After the moves every data block is one sector-aligned run whose bitmap sector is reserved or a
    // move's prefix.
    const { runs: blocks, mustMove } = dataBlocks(input.mapping);
    if (mustMove.length) throw new Error(`vhd build: block at guest ${mustMove[0]!.guest} still needs moving (${mustMove[0]!.reason}); engine bug`);
    const entries = batEntriesFor(virtualSize);
    const batBytes = batBytesFor(entries);
    // A disk of size 0 has no BAT; its offset then only has to lie in the file.
    const batOffset = batBytes > 0 ? alloc.alloc(batBytes, VHD_SECTOR) : HEAD_BYTES;
    const bat = new Uint8Array(batBytes).fill(0xff);
    const batView = new DataView(bat.buffer);
    const bitmap = new Uint8Array(BITMAP_SIZE).fill(0xff);
    const atCommit = new Set(plan.fixedRegions.filter((r) => r.what === COMMIT_BITMAP).map((r) => r.start));
    const commitBitmaps: { offset: number; bytes: Uint8Array }[] = [];
    const writes: HostWrite[] = [];
    let end = Math.max(alloc.end, HEAD_BYTES, batOffset + batBytes);
    for (const b of blocks) {
      if (b.host - BITMAP_SIZE < HEAD_BYTES) throw new Error(`vhd build: block ${b.block}'s bitmap would be under the header (engine bug)`);
      const sector = (b.host - BITMAP_SIZE) / VHD_SECTOR;
      if (sector > MAX_BLOCK_SECTOR) {
        throw new UnsupportedError(
          FORMAT,
          'file size',
          `block ${b.block} would lie at byte ${b.host - BITMAP_SIZE}, beyond the 2 TiB that a VHD's 32-bit BAT sector numbers reach (moved blocks go past the end of the file); -o subformat=fixed keeps a raw disk's data where it lies`,
        );
      }
      batView.setUint32(b.block * 4, sector, false);
      if (atCommit.delete(b.host - BITMAP_SIZE)) commitBitmaps.push({ offset: b.host - BITMAP_SIZE, bytes: bitmap });
      else writes.push({ offset: b.host - BITMAP_SIZE, bytes: bitmap });
      end = Math.max(end, b.host + BLOCK_SIZE);
    }
    if (atCommit.size > 0) throw new Error(`vhd build: ${atCommit.size} bitmaps planned for the commit have no kept block after them (engine bug)`);
    if (batBytes > 0) writes.push({ offset: batOffset, bytes: bat });
    writes.sort((a, b) => a.offset - b.offset);
    const footerAt = alignUp(end, VHD_SECTOR);
    const header = encodeDynHeader({ tableOffset: batOffset, maxTableEntries: entries, blockSize: BLOCK_SIZE });
    return {
      writes,
      fixed: [
        { offset: 0, bytes: footer },
        { offset: FOOTER_SIZE, bytes: header },
        { offset: footerAt, bytes: footer },
        ...commitBitmaps.sort((a, b) => a.offset - b.offset),
      ],
      finalLength: footerAt + FOOTER_SIZE,
      metadataBytes: dynamicMetadataBytes(virtualSize, blocks.length),
    };
  },
};
