/**
 * qcow2 as a conversion target: a header cluster at offset 0, an L1 table, the L2 tables the mapping
 * needs and exact refcounts, pointing every data cluster at the host offset where its data already
 * lies. Every cluster the new image references gets refcount 1 (so every entry carries COPIED) and
 * everything else refcount 0: the old format's metadata becomes free space, not leaks.
 *
 * The refcount structures must count their own clusters, so they are allocated to a fixed point (the
 * approach of qemu-img amend's refcount rebuild): refblocks for every window that holds a referenced
 * cluster, a reftable large enough to point at all of them, repeated until nothing new is needed.
 *
 * The cluster size is chosen as for QED: the one that moves the fewest bytes (data clusters must be
 * cluster-aligned and outside cluster 0), preferring QEMU's default of 64 KiB.
 *
 * With -o data_file_raw=on the image instead becomes the raw external data file of a qcow2 metadata
 * file created beside it: drivers/qcow2/datafile.ts.
 */
import { isPowerOfTwo } from '../../src/binary.js';
import type { Allocator, HostWrite, PlanInput, TargetBuild, TargetDriver, TargetPlan } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import { cheapestClusterSize, clusterize, costSlack, powersOfTwo, type ClusterRun, type MustMove } from '../../src/engine/clusters.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { buildDataFile, planDataFile, wantsDataFile } from './datafile.js';
import { encodeL1Entry, encodeL2Entry, encodeReftableEntry, setRefcount } from './entries.js';
import { EXT_BACKING_FORMAT, EXT_DATA_FILE, encodeExtensions, type HeaderExtension } from './extensions.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZLIB,
  CRYPT_NONE,
  FORMAT,
  INCOMPAT_DATA_FILE,
  MAX_BACKING_NAME,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MIN_CLUSTER_BITS,
  V2_HEADER_LENGTH,
  encodeHeader,
} from './header.js';

const DEFAULT_CLUSTER = 65536;
const MIN_CLUSTER = 2 ** MIN_CLUSTER_BITS;
const MAX_CLUSTER = 2 ** MAX_CLUSTER_BITS;
/** What QEMU writes as header_length for v3 (its struct, with the compression_type byte and padding). */
const V3_HEADER_LENGTH = 112;
/** QEMU keeps the backing format in a 16-byte buffer, NUL included. */
const MAX_BACKING_FORMAT = 15;

const KNOWN_OPTIONS = ['cluster_size', 'compat', 'refcount_bits', 'lazy_refcounts'];
/**
 * qemu-img create options this in-place writer does not do (yet): refused by name rather than ignored.
 * (data_file / data_file_raw=on are taken by the target before these are parsed: drivers/qcow2/datafile.ts;
 * a stream cannot make them.)
 */
const REFUSED_OPTIONS: Record<string, string> = {
  data_file: 'an external data file',
  data_file_raw: 'an external raw data file',
  metadata_file: 'an external raw data file',
  preallocation: 'preallocation',
  encrypt: 'encryption',
  encryption: 'encryption',
  compression_type: 'a compression type (nothing is compressed in place)',
  extended_l2: 'extended L2 entries',
  backing_file: 'changing the backing file',
  backing_fmt: 'changing the backing format',
  size: 'resizing',
  nocow: 'nocow',
};

export interface Qcow2TargetParams {
  clusterSize: number;
  /** 2 (compat=0.10) or 3 (compat=1.1). */
  version: 2 | 3;
  refcountOrder: number;
  lazyRefcounts: boolean;
}

function optionError(name: string, value: string, why: string): UsageError {
  return new UsageError(`-o ${name}=${value}: ${why}`);
}

function parseSize(name: string, v: string): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(v.trim());
  if (!m) throw optionError(name, v, 'not a size (use e.g. 65536 or 64k)');
  const mult = { '': 1, k: 1024, m: 1 << 20, g: 1 << 30 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * mult;
}

function parseBool(name: string, v: string): boolean {
  const s = v.trim().toLowerCase();
  if (s === 'on' || s === 'true' || s === 'yes') return true;
  if (s === 'off' || s === 'false' || s === 'no') return false;
  throw optionError(name, v, 'must be on or off');
}

/** The user's -o options, validated; `clusterSize` is undefined unless forced. */
export function parseQcow2Options(options: Record<string, string>): Omit<Qcow2TargetParams, 'clusterSize'> & { clusterSize?: number } {
  for (const k of Object.keys(options)) {
    const refused = REFUSED_OPTIONS[k] ?? (k.startsWith('encrypt.') ? 'encryption' : undefined);
    if (refused) throw new UsageError(`qcow2 option "${k}" is not supported by in-place conversion (${refused})`);
    if (!KNOWN_OPTIONS.includes(k)) throw new UsageError(`qcow2 has no option "${k}" (known: ${KNOWN_OPTIONS.join(', ')})`);
  }
  let version: 2 | 3 = 3;
  if (options.compat !== undefined) {
    const c = options.compat.trim();
    if (c === '1.1' || c === 'v3') version = 3;
    else if (c === '0.10' || c === 'v2') version = 2;
    else throw optionError('compat', options.compat, 'must be 1.1 (v3) or 0.10 (v2)');
  }
  let refcountOrder = 4;
  if (options.refcount_bits !== undefined) {
    const bits = Number(options.refcount_bits.trim());
    if (!Number.isInteger(bits) || !isPowerOfTwo(bits) || bits < 1 || bits > 64) {
      throw optionError('refcount_bits', options.refcount_bits, 'must be a power of two from 1 to 64');
    }
    refcountOrder = Math.log2(bits);
    // Version 2 images have no refcount_order field: their refcounts are always 16 bits.
    if (version === 2 && refcountOrder !== 4) throw optionError('refcount_bits', options.refcount_bits, 'compat=0.10 images only have 16-bit refcounts');
  }
  let lazyRefcounts = false;
  if (options.lazy_refcounts !== undefined) {
    lazyRefcounts = parseBool('lazy_refcounts', options.lazy_refcounts);
    if (lazyRefcounts && version === 2) throw optionError('lazy_refcounts', options.lazy_refcounts, 'lazy refcounts need compat=1.1');
  }
  let clusterSize: number | undefined;
  if (options.cluster_size !== undefined) {
    clusterSize = parseSize('cluster_size', options.cluster_size);
    if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER || clusterSize > MAX_CLUSTER) {
      throw optionError('cluster_size', options.cluster_size, `must be a power of two from ${MIN_CLUSTER} to ${MAX_CLUSTER / (1 << 20)} MiB`);
    }
  }
  return { version, refcountOrder, lazyRefcounts, ...(clusterSize !== undefined ? { clusterSize } : {}) };
}

// ---------------------------------------------------------------------------------------------------
// Cluster 0: header, header extensions, backing file name.

function headerLength(version: 2 | 3): number {
  return version === 3 ? V3_HEADER_LENGTH : V2_HEADER_LENGTH;
}

/**
 * An external data file (drivers/qcow2/datafile.ts): its name, relative to the qcow2 file, goes into
 * the data file header extension; `raw` sets the data_file_raw autoclear bit.
 */
export interface DataFileRef {
  name: string;
  raw: boolean;
}

function extensionsFor(backingFormat: string | undefined, dataFile?: DataFileRef): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  if (backingFormat) out.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(backingFormat, 'utf8') });
  if (dataFile) out.push({ type: EXT_DATA_FILE, data: Buffer.from(dataFile.name, 'utf8') });
  return out;
}

/** Bytes cluster 0 needs: header, extensions with the end marker, backing name. */
export function cluster0Bytes(version: 2 | 3, backing: PlanInput['info']['backing'], dataFile?: DataFileRef): number {
  return headerLength(version) + encodeExtensions(extensionsFor(backing?.format, dataFile)).length + Buffer.byteLength(backing?.filename ?? '', 'utf8');
}

function checkBacking(backing: PlanInput['info']['backing']): void {
  if (!backing) return;
  if (Buffer.byteLength(backing.filename, 'utf8') > MAX_BACKING_NAME) {
    throw new UnsupportedError(FORMAT, 'backing file name', `${Buffer.byteLength(backing.filename, 'utf8')} bytes is longer than QEMU allows (${MAX_BACKING_NAME})`);
  }
  if (backing.format !== undefined && Buffer.byteLength(backing.format, 'utf8') > MAX_BACKING_FORMAT) {
    throw new UnsupportedError(FORMAT, 'backing format', `"${backing.format}" is longer than QEMU allows (${MAX_BACKING_FORMAT} bytes)`);
  }
}

interface Cluster0Fields {
  l1Entries: number;
  l1Offset: number;
  reftableOffset: number;
  reftableClusters: number;
}

export function encodeCluster0(p: Qcow2TargetParams, virtualSize: number, backing: PlanInput['info']['backing'], f: Cluster0Fields, dataFile?: DataFileRef): Uint8Array {
  const cs = p.clusterSize;
  const out = new Uint8Array(cs);
  if (dataFile && p.version !== 3) throw new Error('qcow2 target: an external data file needs version 3; plan() should have refused');
  const extensions = encodeExtensions(extensionsFor(backing?.format, dataFile));
  const extStart = headerLength(p.version);
  const nameOffset = extStart + extensions.length;
  const name = Buffer.from(backing?.filename ?? '', 'utf8');
  if (nameOffset + name.length > cs) throw new Error(`qcow2 target: cluster 0 overflows (${nameOffset + name.length} > ${cs}); plan() should have refused`);
  out.set(
    encodeHeader({
      version: p.version,
      backingFileOffset: backing ? nameOffset : 0,
      backingFileSize: backing ? name.length : 0,
      clusterBits: Math.log2(cs),
      size: virtualSize,
      cryptMethod: CRYPT_NONE,
      l1Size: f.l1Entries,
      l1TableOffset: f.l1Offset,
      refcountTableOffset: f.reftableOffset,
      refcountTableClusters: f.reftableClusters,
      nbSnapshots: 0,
      snapshotsOffset: 0,
      incompatibleFeatures: dataFile ? INCOMPAT_DATA_FILE : 0n,
      compatibleFeatures: p.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
      autoclearFeatures: dataFile?.raw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
      refcountOrder: p.refcountOrder,
      headerLength: headerLength(p.version),
      compressionType: COMPRESSION_ZLIB,
    }),
    0,
  );
  out.set(extensions, extStart);
  out.set(name, nameOffset);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Layout: where every table goes. Pure but for `alloc`; encodes nothing, so plan() can run it on a
// simulated allocator to know the exact metadata size.

/** Guest bytes one L2 table maps. */
function l2Span(cs: number): number {
  return cs * (cs / 8);
}

function l1EntriesFor(cs: number, virtualSize: number): number {
  return Math.ceil(virtualSize / l2Span(cs));
}

/** Host clusters [start, end), in cluster units. */
type ClusterInterval = [number, number];

export interface TargetLayout {
  l1Entries: number;
  l1Offset: number;
  l1Clusters: number;
  /** L1 index → L2 table offset, in L1 order. */
  l2: Map<number, number>;
  reftableOffset: number;
  reftableClusters: number;
  /** Refblock window index → refblock offset. */
  refblocks: Map<number, number>;
  /** Every cluster with refcount 1, sorted and disjoint. */
  referenced: ClusterInterval[];
  finalLength: number;
  metadataBytes: number;
}

/** Whether a run needs L2 entries (v2 has no zero clusters: without a backing file they stay unallocated). */
function mapsSomething(r: ClusterRun, version: 2 | 3): boolean {
  return r.kind === 'data' || (r.kind === 'zero' && version === 3);
}

/**
 * `external`: data runs point into an external data file, so their clusters are not the qcow2 file's
 * and get no refcount (QEMU counts only the metadata file's own clusters).
 */
export function layOut(p: Qcow2TargetParams, runs: ClusterRun[], virtualSize: number, alloc: Allocator, external = false): TargetLayout {
  const cs = p.clusterSize;
  const span = l2Span(cs);
  const l1Entries = l1EntriesFor(cs, virtualSize);
  const l1Clusters = Math.ceil((l1Entries * 8) / cs);
  const l1Offset = l1Clusters > 0 ? alloc.alloc(l1Clusters * cs, cs) : 0;

  const l2 = new Map<number, number>();
  for (const r of runs) {
    if (!mapsSomething(r, p.version)) continue;
    for (let i = Math.floor(r.guest / span); i <= Math.floor((r.guest + r.length - 1) / span); i++) {
      if (!l2.has(i)) l2.set(i, alloc.alloc(cs, cs));
    }
  }

  const pieces: ClusterInterval[] = [[0, 1]];
  if (l1Clusters > 0) pieces.push([l1Offset / cs, l1Offset / cs + l1Clusters]);
  for (const off of l2.values()) pieces.push([off / cs, off / cs + 1]);
  for (const r of runs) {
    if (r.kind !== 'data' || external) continue;
    if (r.host! % cs !== 0) throw new Error(`qcow2 target: data run at guest ${r.guest} lies at unaligned host ${r.host}`);
    pieces.push([r.host! / cs, r.host! / cs + Math.ceil(r.length / cs)]);
  }

  // Refcount structures, to a fixed point: each refblock covers `perBlock` clusters.
  const perBlock = (cs * 8) / (1 << p.refcountOrder);
  const refblocks = new Map<number, number>();
  let reftable: { offset: number; clusters: number } | undefined;
  const reftableClustersFor = (windows: number) => Math.ceil((windows * 8) / cs);
  let maxWindow = -1;
  let scanned = 0;
  const missing = new Set<number>();
  const findMissing = (a: number, b: number) => {
    for (let w = Math.floor(a / perBlock); w <= Math.floor((b - 1) / perBlock); w++) {
      maxWindow = Math.max(maxWindow, w);
      if (!refblocks.has(w)) missing.add(w);
    }
  };
  for (;;) {
    while (scanned < pieces.length) {
      const [a, b] = pieces[scanned++]!;
      findMissing(a, b);
    }
    if (reftable) findMissing(reftable.offset / cs, reftable.offset / cs + reftable.clusters);
    if (missing.size > 0) {
      // One contiguous run for all the missing refblocks: it opens at most a window or two of its
      // own, where one cluster per refblock could each land in a fresh window of a fragmented file.
      const run = alloc.alloc(missing.size * cs, cs);
      [...missing].sort((x, y) => x - y).forEach((w, k) => refblocks.set(w, run + k * cs));
      pieces.push([run / cs, run / cs + missing.size]);
      missing.clear();
      continue;
    }
    if (reftable && reftable.clusters >= reftableClustersFor(maxWindow + 1)) break;
    // (Re)allocate the reftable with room for the windows that it and its own refblocks may still
    // open past the current end. A table outgrown this way stays unreferenced: refcount 0, free
    // space rather than a leak.
    let clusters = reftableClustersFor(maxWindow + 1);
    for (let i = 0; i < 2; i++) {
      const endCluster = Math.ceil(alloc.end / cs) + clusters + 2;
      clusters = reftableClustersFor(Math.max(maxWindow + 1, Math.floor(endCluster / perBlock) + 1));
    }
    if (clusters * cs > MAX_REFTABLE_BYTES) {
      throw new UnsupportedError(FORMAT, 'refcount table size', `${clusters * cs} bytes exceeds QEMU's limit of ${MAX_REFTABLE_BYTES}; use larger clusters or fewer refcount bits`);
    }
    reftable = { offset: alloc.alloc(clusters * cs, cs), clusters };
  }
  pieces.push([reftable.offset / cs, reftable.offset / cs + reftable.clusters]);

  const referenced = mergeDisjoint(pieces, cs);
  const referencedEnd = referenced.length ? referenced[referenced.length - 1]![1] * cs : cs;
  const metadataBytes = cs * (1 + l1Clusters + l2.size + reftable.clusters + refblocks.size);
  return {
    l1Entries,
    l1Offset,
    l1Clusters,
    l2,
    reftableOffset: reftable.offset,
    reftableClusters: reftable.clusters,
    refblocks,
    referenced,
    // Covers every referenced cluster whole, so a data cluster that ran past the old end is inside.
    finalLength: Math.max(alloc.end, referencedEnd),
    metadataBytes,
  };
}

/** Sorts the intervals; two that overlap would need refcount 2, which this writer never makes. */
function mergeDisjoint(pieces: ClusterInterval[], cs: number): ClusterInterval[] {
  const sorted = pieces.slice().sort((x, y) => x[0] - y[0]);
  const out: ClusterInterval[] = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last && a < last[1]) {
      throw new UnsupportedError(FORMAT, 'shared host cluster', `host offset ${a * cs} would be referenced twice (shared clusters need refcounts above 1)`);
    }
    if (last && a === last[1]) last[1] = b;
    else out.push([a, b]);
  }
  return out;
}

/** L1, L2 tables, reftable and refblocks of a layout, as writes in offset order. */
export function encodeTables(p: Qcow2TargetParams, layout: TargetLayout, runs: ClusterRun[]): HostWrite[] {
  const cs = p.clusterSize;
  const span = l2Span(cs);
  const entriesPerL2 = cs / 8;

  const l1 = new Uint8Array(layout.l1Clusters * cs);
  const l1v = new DataView(l1.buffer);
  const l2Tables = new Map<number, Uint8Array>();
  const l2Views = new Map<number, DataView>();
  // Every L2 table is a piece of one allocation (128 MiB for a fully mapped 1 TiB image): once the
  // engine has written them and let them go, the whole block goes back to the system at once, where
  // thousands of 64 KiB buffers would stay in the allocator's heap and keep the process that large.
  const l2Arena = new Uint8Array(layout.l2.size * cs);
  let l2Next = 0;
  for (const [index, offset] of layout.l2) {
    const [hi, lo] = encodeL1Entry({ l2Offset: offset, copied: true, reserved: 0n });
    l1v.setUint32(index * 8, hi);
    l1v.setUint32(index * 8 + 4, lo);
    const table = l2Arena.subarray(l2Next, l2Next + cs);
    l2Next += cs;
    l2Tables.set(index, table);
    l2Views.set(index, new DataView(table.buffer, table.byteOffset, cs));
  }
  const bits = Math.log2(cs);
  const [zeroHi, zeroLo] = encodeL2Entry({ compressed: false, copied: false, offset: 0, zero: true, reserved: 0n }, bits);
  // A data entry is COPIED plus the offset, split into u32 halves (what encodeL2Entry gives for
  // { copied: true, zero: false }); written per run and per L2 table, not through an object per cluster.
  const COPIED_HI = 0x80000000;
  for (const r of runs) {
    if (!mapsSomething(r, p.version)) continue;
    const data = r.kind === 'data';
    const end = r.guest + r.length;
    for (let g = r.guest; g < end; ) {
      const index = Math.floor(g / span);
      const dv = l2Views.get(index)!;
      const stop = Math.min(end, (index + 1) * span);
      let at = ((g / cs) % entriesPerL2) * 8;
      if (data) {
        // The halves carried along (no division per entry): lo steps by the cluster size, hi on overflow.
        const offset = r.host! + (g - r.guest);
        let hi = Math.floor(offset / 0x1_0000_0000);
        let lo = offset % 0x1_0000_0000;
        for (; g < stop; g += cs, at += 8) {
          dv.setUint32(at, (COPIED_HI | hi) >>> 0);
          dv.setUint32(at + 4, lo);
          lo += cs;
          if (lo >= 0x1_0000_0000) {
            lo -= 0x1_0000_0000;
            hi++;
          }
        }
      } else {
        for (; g < stop; g += cs, at += 8) {
          dv.setUint32(at, zeroHi);
          dv.setUint32(at + 4, zeroLo);
        }
      }
    }
  }

  const perBlock = (cs * 8) / (1 << p.refcountOrder);
  const reftable = new Uint8Array(layout.reftableClusters * cs);
  const rtv = new DataView(reftable.buffer);
  // Refcount blocks whose clusters are all referenced are identical (every refcount 1): they share one
  // buffer, written at each of their offsets (a 1 TiB image with every cluster mapped has 512 of them,
  // 32 MiB at 64 KiB clusters). Blocks with anything else, or nothing, get their own.
  const blocks = new Map<number, Uint8Array>();
  let full: Uint8Array | undefined;
  const fullBlock = () => {
    if (!full) {
      full = new Uint8Array(cs);
      for (let k = 0; k < perBlock; k++) setRefcount(full, k, p.refcountOrder, 1);
    }
    return full;
  };
  for (const [w, offset] of layout.refblocks) {
    const [hi, lo] = encodeReftableEntry({ offset, reserved: 0 });
    rtv.setUint32(w * 8, hi);
    rtv.setUint32(w * 8 + 4, lo);
  }
  for (const [a, b] of layout.referenced) {
    // Block by block: one lookup per refcount block, not per cluster. The intervals are disjoint, so an
    // interval covering a whole block is the only one touching it.
    for (let k = a; k < b; ) {
      const w = Math.floor(k / perBlock);
      const stop = Math.min(b, (w + 1) * perBlock);
      if (k === w * perBlock && stop === (w + 1) * perBlock) {
        blocks.set(w, fullBlock());
        k = stop;
        continue;
      }
      let block = blocks.get(w);
      if (!block) blocks.set(w, (block = new Uint8Array(cs)));
      for (; k < stop; k++) setRefcount(block, k - w * perBlock, p.refcountOrder, 1);
    }
  }
  for (const w of layout.refblocks.keys()) if (!blocks.has(w)) blocks.set(w, new Uint8Array(cs));

  const writes: HostWrite[] = [];
  if (layout.l1Clusters > 0) writes.push({ offset: layout.l1Offset, bytes: l1 });
  for (const [index, offset] of layout.l2) writes.push({ offset, bytes: l2Tables.get(index)! });
  writes.push({ offset: layout.reftableOffset, bytes: reftable });
  for (const [w, offset] of layout.refblocks) writes.push({ offset, bytes: blocks.get(w)! });
  writes.sort((x, y) => x.offset - y.offset);
  return writes;
}

// ---------------------------------------------------------------------------------------------------
// Planning.

/** v2 cannot say "zero": over a backing file a zero run must become real zero-filled data. */
function zeroRunsToMove(runs: ClusterRun[]): MustMove[] {
  return runs.filter((r) => r.kind === 'zero').map((r) => ({ guest: r.guest, length: r.length, reason: 'compat=0.10 has no zero clusters and the image has a backing file' }));
}

interface Candidate {
  cs: number;
  runs: ClusterRun[];
  mustMove: MustMove[];
  moveBytes: number;
  /** Exact after simulate(); until then the lower bound screen() computes. */
  metadataBytes: number;
}

/** The guest runs as they will be after the moves: moved ranges become data (host unknown yet). */
function runsAfterMoves(p: Qcow2TargetParams, runs: ClusterRun[], mustMove: MustMove[], hasBacking: boolean, hostOf: (m: MustMove) => number): ClusterRun[] {
  const moved: ClusterRun[] = mustMove.map((m) => ({ guest: m.guest, length: m.length, kind: 'data', host: hostOf(m) }));
  return [...runs.filter((r) => !(p.version === 2 && hasBacking && r.kind === 'zero')), ...moved].sort((a, b) => a.guest - b.guest);
}

/** L2 tables a guest-ordered run list needs. */
function countL2(p: Qcow2TargetParams, runs: ClusterRun[]): number {
  const span = l2Span(p.clusterSize);
  let count = 0;
  let last = -1;
  for (const r of runs) {
    if (!mapsSomething(r, p.version)) continue;
    const first = Math.max(last + 1, Math.floor(r.guest / span));
    const end = Math.floor((r.guest + r.length - 1) / span);
    if (end >= first) count += end - first + 1;
    last = Math.max(last, end);
  }
  return count;
}

/**
 * Lays the candidate out against an allocator set up as the engine sets up its own (source free
 * space minus cluster 0, then past the end; moved data first), so the metadata size is exact.
 */
function simulate(p: Qcow2TargetParams, input: PlanInput, c: Candidate): number {
  const cs = p.clusterSize;
  const alloc = new GapAllocator(input.hostSpace.free(), [{ start: 0, length: cs }], Math.max(input.fileSize, input.hostSpace.usedEnd()));
  const runs = runsAfterMoves(p, c.runs, c.mustMove, input.info.backing !== undefined, (m) => alloc.alloc(m.length, cs));
  return layOut(p, runs, input.info.virtualSize, alloc).metadataBytes;
}

/** What must move at this cluster size and a lower bound of its metadata, or why it cannot be used. */
function screen(p: Qcow2TargetParams, input: PlanInput): Candidate | string {
  const cs = p.clusterSize;
  const { virtualSize, backing } = input.info;
  if (l1EntriesFor(cs, virtualSize) * 8 > MAX_L1_BYTES) return `${virtualSize} bytes needs an L1 table larger than QEMU's ${MAX_L1_BYTES}-byte limit with ${cs}-byte clusters`;
  if (cluster0Bytes(p.version, backing) > cs) return `the header and backing file name do not fit in one ${cs}-byte cluster`;
  const c = clusterize(input.mapping, cs, { reserved: [{ start: 0, length: cs }], hasBacking: backing !== undefined });
  const mustMove = p.version === 2 && backing ? [...c.mustMove, ...zeroRunsToMove(c.runs)].sort((a, b) => a.guest - b.guest) : c.mustMove;
  const moveBytes = mustMove.reduce((s, m) => s + m.length, 0);
  const l1Clusters = Math.ceil((l1EntriesFor(cs, virtualSize) * 8) / cs);
  const l2Tables = countL2(p, runsAfterMoves(p, c.runs, mustMove, backing !== undefined, () => 0));
  // Cluster 0, L1, L2s, and at least one reftable cluster and one refblock.
  const lowerBound = cs * (1 + l1Clusters + l2Tables + 2);
  return { cs, runs: c.runs, mustMove, moveBytes, metadataBytes: lowerBound };
}

/**
 * The candidates worth laying out in full, with exact metadata: in order of their lower-bound cost,
 * stopping once a lower bound exceeds the best exact cost (such a size can never win). This keeps
 * 512-byte clusters on a large disk (millions of L2 tables) from being laid out at all.
 */
function exactCandidates(opts: Omit<Qcow2TargetParams, 'clusterSize'>, input: PlanInput, screened: Candidate[], refusals: string[]): Candidate[] {
  const cost = (c: Candidate) => 2 * c.moveBytes + c.metadataBytes;
  const out: Candidate[] = [];
  let best = Infinity;
  const slack = costSlack(input.info.virtualSize);
  for (const c of screened.slice().sort((a, b) => cost(a) - cost(b))) {
    if (cost(c) > best + slack) break;
    try {
      const exact = { ...c, metadataBytes: simulate({ ...opts, clusterSize: c.cs }, input, c) };
      out.push(exact);
      best = Math.min(best, cost(exact));
    } catch (e) {
      if (!(e instanceof UnsupportedError)) throw e;
      refusals.push(e.message);
    }
  }
  return out;
}

function paramsOf(plan: TargetPlan): Qcow2TargetParams {
  const q = plan.parameters;
  return {
    clusterSize: q.cluster_size as number,
    version: q.compat === '0.10' ? 2 : 3,
    refcountOrder: Math.log2(q.refcount_bits as number),
    lazyRefcounts: q.lazy_refcounts === true,
  };
}

export const qcow2Target: TargetDriver = {
  plan(input: PlanInput): TargetPlan {
    if (wantsDataFile(input.options)) return planDataFile(input);
    const opts = parseQcow2Options(input.options);
    const { virtualSize, backing } = input.info;
    checkBacking(backing);
    if (virtualSize % 512 !== 0) {
      throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is not a multiple of 512 (qcow2 counts the size in sectors)`);
    }
    const sizes = opts.clusterSize !== undefined ? [opts.clusterSize] : powersOfTwo(MIN_CLUSTER, MAX_CLUSTER);
    const screened: Candidate[] = [];
    const refusals: string[] = [];
    for (const cs of sizes) {
      const c = screen({ ...opts, clusterSize: cs }, input);
      if (typeof c === 'string') refusals.push(c);
      else screened.push(c);
    }
    const candidates = exactCandidates(opts, input, screened, refusals);
    if (candidates.length === 0) {
      if (opts.clusterSize !== undefined) throw new UsageError(`-o cluster_size=${input.options.cluster_size}: ${refusals[0]}`);
      throw new UnsupportedError(FORMAT, 'image', `no cluster size can hold this image: ${refusals[refusals.length - 1]}`);
    }
    const cs = cheapestClusterSize(candidates, DEFAULT_CLUSTER, virtualSize);
    const chosen = candidates.find((c) => c.cs === cs)!;
    return {
      format: FORMAT,
      parameters: {
        cluster_size: cs,
        compat: opts.version === 3 ? '1.1' : '0.10',
        refcount_bits: 1 << opts.refcountOrder,
        lazy_refcounts: opts.lazyRefcounts,
      },
      fixedRegions: [{ start: 0, length: cs, what: 'qcow2 header cluster' }],
      mustMove: chosen.mustMove,
      dataAlignment: cs,
      dropped: [],
      metadataBytes: chosen.metadataBytes,
    };
  },

  build(plan: TargetPlan, input: PlanInput, alloc: Allocator): TargetBuild {
    if (plan.parameters.data_file_raw === true) return buildDataFile(plan, input);
    const p = paramsOf(plan);
    const cs = p.clusterSize;
    const { virtualSize, backing } = input.info;
    const c = clusterize(input.mapping, cs, { reserved: [{ start: 0, length: cs }], hasBacking: backing !== undefined });
    if (c.mustMove.length) throw new Error(`qcow2 build: ${c.mustMove.length} ranges still need moving (engine bug)`);
    if (p.version === 2 && backing && c.runs.some((r) => r.kind === 'zero')) throw new Error('qcow2 build: zero runs over a backing file were not materialised (engine bug)');
    const layout = layOut(p, c.runs, virtualSize, alloc);
    const writes = encodeTables(p, layout, c.runs);

    const cluster0 = encodeCluster0(p, virtualSize, backing, {
      l1Entries: layout.l1Entries,
      l1Offset: layout.l1Offset,
      reftableOffset: layout.reftableOffset,
      reftableClusters: layout.reftableClusters,
    });
    return { writes, fixed: [{ offset: 0, bytes: cluster0 }], finalLength: layout.finalLength, metadataBytes: layout.metadataBytes };
  },
};
