/**
 * Strict reading of the L1/L2 tables: every entry is validated the way QEMU validates it on the
 * read path (block/qcow2-cluster.c qcow2_get_host_offset, which marks the image corrupt) plus the
 * reserved-bit and bounds rules qemu-img check applies. Any violation is a FormatError naming the
 * entry; the lenient counting variant is check.ts.
 */
import { readAt } from '../../src/blockdev/types.js';
import { ExtentMap } from '../../src/extent-map.js';
import { FormatError } from '../../src/errors.js';
import {
  compressedFields,
  compressedLength,
  decodeL1Entry,
  decodeL2Entry,
  entryOffset,
  isCompressedEntry,
  isCopied,
  isZeroFlag,
  l1ReservedBits,
  l2ReservedBits,
  type StandardL2Entry,
} from './entries.js';
import { FORMAT, MAX_L1_BYTES, validateTable } from './header.js';
import type { Qcow2Layout } from './open.js';

export const SUBCLUSTERS = 32;

const hex = (n: number) => `0x${n.toString(16)}`;

/** One L2 entry, classified (QEMU's cluster types; extended L2 keeps its bitmap for per-subcluster states). */
export type ClusterState =
  | { type: 'unallocated' }
  | { type: 'zero' }
  | { type: 'zeroAlloc'; host: number }
  | { type: 'normal'; host: number }
  | { type: 'compressed'; host: number; length: number }
  /** Extended L2: per-subcluster bits; `host` when the cluster has one. */
  | { type: 'subclusters'; host?: number; alloc: number; zero: number };

export async function readL1(layout: Qcow2Layout, offset: number, entries: number, field: string, offsetField: string): Promise<DataView> {
  validateTable(field, offsetField, offset, entries, 8, MAX_L1_BYTES, layout.clusterSize, layout.fileSize);
  const bytes = await readAt(layout.dev, offset, entries * 8);
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** One L2 table; `into` (a cluster-sized buffer) is reused when given, so a scan of thousands allocates once. */
export async function readL2(layout: Qcow2Layout, offset: number, into?: Uint8Array): Promise<DataView> {
  if (!into) {
    const bytes = await readAt(layout.dev, offset, layout.clusterSize);
    return new DataView(bytes.buffer);
  }
  let got = 0;
  while (got < into.length) {
    const n = await layout.dev.read(into.subarray(got), offset + got);
    if (n === 0) break;
    got += n;
  }
  into.fill(0, got); // past the end of the file: zeros, as readAt gives
  return new DataView(into.buffer, into.byteOffset, into.length);
}

/** Bytes of neighbouring L2 tables read at once (at least one table), and how far reading runs ahead. */
const L2_BATCH_BYTES = 2 << 20;
/** Most batches read ahead of the one visited (one, whatever its size; more while they stay under L2_BATCH_BYTES). */
const L2_READS_AHEAD = 32;

/**
 * Visits L2 tables 0..count−1 in order: `offsetOf(i)` gives table i's offset (0: none; it may throw,
 * e.g. on a malformed L1 entry), `visit(i, offset, table)` sees it (`table` undefined for offset 0).
 * Tables lying side by side in the file are read with one read of up to 2 MiB, and later batches are
 * read while the current one is visited: a 1 TiB image has 2,048 tables, and one awaited read each
 * kept the scans waiting. Tables that do not lie side by side (qemu-img writes each next to the data it
 * maps: 32,768 tables of 512 bytes in a 1 GiB image with 512-byte clusters) are read up to
 * L2_READS_AHEAD at a time instead of one after the other. Order and errors are those of a
 * table-by-table loop: an offset that throws is thrown when its turn comes, after the tables before it
 * were visited; a read error likewise. The DataView given to `visit` is valid only during the call
 * (its buffer is reused).
 */
export async function forEachL2(
  layout: Qcow2Layout,
  count: number,
  offsetOf: (i: number) => number,
  visit: (i: number, offset: number, table: DataView | undefined) => void | Promise<void>,
): Promise<void> {
  const cs = layout.clusterSize;
  const perBatch = Math.max(1, Math.floor(L2_BATCH_BYTES / cs));
  interface Batch {
    first: number;
    /** Offsets of tables first.., ending where an offset threw (error) or at a table that does not continue the run. */
    offsets: number[];
    error?: { e: unknown };
    buf?: Uint8Array;
    read?: Promise<void>;
    /** `buf` is a table kept from an earlier scan (keepL2Tables), not a pooled buffer. */
    kept?: boolean;
  }
  const size = perBatch * cs;
  const kept = keptTables.get(layout);
  const plan = (first: number): Batch => {
    const b: Batch = { first, offsets: [] };
    for (let i = first; i < count && b.offsets.length < perBatch; i++) {
      let off: number;
      try {
        off = offsetOf(i);
      } catch (e) {
        b.error = { e };
        break;
      }
      const known = off !== 0 ? kept?.tables.get(off) : undefined;
      if (known) {
        // A table an earlier scan kept: a batch of its own, without a read.
        if (b.offsets.length > 0) break;
        b.offsets.push(off);
        b.buf = known;
        b.kept = true;
        return b;
      }
      const prev = b.offsets[b.offsets.length - 1];
      // A batch is one table without a read (offset 0), or tables that continue each other.
      if (prev !== undefined && (prev === 0 || off === 0 || off !== prev + cs)) {
        // Table i belongs to the next batch; its offset is asked again then (offsetOf is pure).
        break;
      }
      b.offsets.push(off);
      if (off === 0) break;
    }
    if (b.offsets.length > 0 && b.offsets[0] !== 0) {
      const bytes = b.offsets.length * cs;
      // A whole batch gets a pooled buffer; a shorter one a buffer of its own size (pooled too).
      b.buf = takeBatchBuffer(bytes === size ? size : bytes);
      const start = b.offsets[0]!;
      b.read = (async () => {
        let got = 0;
        while (got < bytes) {
          const n = await layout.dev.read(b.buf!.subarray(got), start + got);
          if (n === 0) break;
          got += n;
        }
        b.buf!.fill(0, got); // past the end of the file: zeros, as readAt gives
      })();
      b.read.catch(() => undefined); // awaited in turn below; not an unhandled rejection meanwhile
    }
    return b;
  };
  // Batches planned (and their reads started) but not yet visited, in order; `ahead` their buffer bytes.
  const queue: Batch[] = [];
  let ahead = 0;
  let planned = 0; // tables planned so far
  let stopped = false; // a batch ended at an offset that threw: nothing is planned past it
  const fill = () => {
    while (!stopped && planned < count && (queue.length === 0 || (queue.length < L2_READS_AHEAD && ahead < L2_BATCH_BYTES))) {
      const b = plan(planned);
      queue.push(b);
      ahead += b.kept ? 0 : (b.buf?.length ?? 0);
      planned = b.first + b.offsets.length;
      if (b.error) stopped = true;
    }
  };
  fill();
  while (queue.length > 0) {
    const b = queue.shift()!;
    ahead -= b.kept ? 0 : (b.buf?.length ?? 0);
    fill();
    if (b.read) {
      await b.read;
      // Only short batches: a run of tables side by side costs one read per 2 MiB anyway.
      if (kept && b.offsets.length * cs <= KEEP_BATCH_BYTES) keep(kept, b.offsets, b.buf!, cs);
    }
    for (let k = 0; k < b.offsets.length; k++) {
      const off = b.offsets[k]!;
      await visit(b.first + k, off, off === 0 ? undefined : new DataView(b.buf!.buffer, b.buf!.byteOffset + k * cs, cs));
    }
    if (b.buf && !b.kept) giveBatchBuffer(b.buf);
    if (b.error) throw b.error.e; // nothing was read ahead (no batch is planned past an error)
  }
  // At most a few buffers stay for the next scan (a conversion scans the tables several times): a
  // fresh pair per scan was garbage the collector left lying around (+18 MiB of RSS at 64 GiB).
  trimBatchPool();
}

/**
 * L2 tables kept between the scans of one image's analysis. Opening a qcow2 scans its tables for the
 * cluster kinds, then mapping() and hostSpace() scan them again; an image with 512-byte clusters has
 * one 512-byte table per 32 KiB of data, each next to the data it maps (32,768 reads of 512 bytes per
 * scan at 1 GiB). Kept by host offset (the bytes there, whichever L1 names them) while the image is
 * analysed, up to KEEP_TABLE_BYTES, when they were read in short batches (tables side by side cost one
 * read per 2 MiB anyway): the image is only read meanwhile (a qcow2 source is never written through
 * its own tables), and dropL2Tables ends it once the host space is built.
 */
const KEEP_TABLE_BYTES = 32 << 20;
const KEEP_BATCH_BYTES = 256 << 10;
const keptTables = new WeakMap<Qcow2Layout, { tables: Map<number, Uint8Array>; bytes: number }>();

/** Keeps the tables this layout's scans read, when they can fit (its L1 names at most KEEP_TABLE_BYTES of them). */
export function keepL2Tables(layout: Qcow2Layout): void {
  if (layout.header.l1Size * layout.clusterSize <= KEEP_TABLE_BYTES) keptTables.set(layout, { tables: new Map(), bytes: 0 });
}

export function dropL2Tables(layout: Qcow2Layout): void {
  keptTables.delete(layout);
}

function keep(k: { tables: Map<number, Uint8Array>; bytes: number }, offsets: number[], buf: Uint8Array, cs: number): void {
  for (let j = 0; j < offsets.length && k.bytes + cs <= KEEP_TABLE_BYTES; j++) {
    if (k.tables.has(offsets[j]!)) continue;
    k.tables.set(offsets[j]!, buf.slice(j * cs, (j + 1) * cs));
    k.bytes += cs;
  }
}

/** Batch buffers between scans and batches, any size; takeBatchBuffer takes one of the size asked for. */
const batchPool: Uint8Array[] = [];
/** What the pool keeps: two whole batches' bytes, and no more buffers than a read-ahead uses. */
const POOL_KEEP_BYTES = 2 * L2_BATCH_BYTES;
const POOL_KEEP_BUFFERS = L2_READS_AHEAD + 2;
function takeBatchBuffer(size: number): Uint8Array {
  for (let i = batchPool.length - 1; i >= 0; i--) {
    if (batchPool[i]!.length === size) return batchPool.splice(i, 1)[0]!;
  }
  return new Uint8Array(size);
}
function giveBatchBuffer(buf: Uint8Array): void {
  batchPool.push(buf);
  trimBatchPool();
}
/** Drops the oldest buffers past the pool's limits. */
function trimBatchPool(): void {
  let bytes = 0;
  for (const b of batchPool) bytes += b.length;
  while (batchPool.length > 0 && (bytes > POOL_KEEP_BYTES || batchPool.length > POOL_KEEP_BUFFERS)) bytes -= batchPool.shift()!.length;
}

/** A host cluster some entry points at: aligned and starting inside the file (qemu-img check allows a partial last cluster). */
export function requireHostCluster(layout: Qcow2Layout, field: string, offset: number, where: () => string): void {
  if (offset % layout.clusterSize !== 0) {
    throw new FormatError(FORMAT, field, offset, `not aligned to the cluster size ${layout.clusterSize} (${where()}); QEMU marks such an image corrupt`);
  }
  if (offset >= layout.fileSize) throw new FormatError(FORMAT, field, offset, `past the end of the file (${layout.fileSize} bytes) (${where()})`);
}

/** The L2 table offset of L1 entry `index`, or 0 when unallocated. */
export function l1EntryL2Offset(layout: Qcow2Layout, dv: DataView, index: number, table: string): number {
  const hi = dv.getUint32(index * 8);
  const lo = dv.getUint32(index * 8 + 4);
  if (l1ReservedBits(hi, lo)) {
    throw new FormatError(FORMAT, 'L1 entry', `${table}[${index}]`, `reserved bits set (0x${decodeL1Entry(hi, lo).reserved.toString(16)})`);
  }
  const l2Offset = entryOffset(hi, lo);
  if (l2Offset !== 0) requireHostCluster(layout, 'L2 table offset', l2Offset, () => `${table}[${index}]`);
  return l2Offset;
}

/**
 * Entry `index` of an L2 table mapping guest cluster `guest` (QEMU qcow2_get_cluster_type and
 * qcow2_get_subcluster_type). With an external data file every allocated cluster must sit at its
 * guest offset, and offset 0 with COPIED is guest cluster 0.
 */
export function classifyL2(layout: Qcow2Layout, dv: DataView, index: number, guest: number, l2Offset: number): ClusterState {
  const at = index * layout.l2EntryBytes;
  const hi = dv.getUint32(at);
  const lo = dv.getUint32(at + 4);
  const zeroBits = layout.extendedL2 ? dv.getUint32(at + 8) : 0;
  const allocBits = layout.extendedL2 ? dv.getUint32(at + 12) : 0;
  if (hi === 0 && lo === 0 && zeroBits === 0 && allocBits === 0) return { type: 'unallocated' };
  const where = () => `L2 table ${hex(l2Offset)} entry ${index}`;
  const external = layout.dataFileName !== undefined;
  if (isCompressedEntry(hi)) {
    if (isCopied(hi)) throw new FormatError(FORMAT, 'L2 entry', where(), 'COPIED set on a compressed cluster');
    if (external) throw new FormatError(FORMAT, 'L2 entry', where(), 'compressed cluster in an image with an external data file');
    if (zeroBits || allocBits) throw new FormatError(FORMAT, 'subcluster bitmap', where(), 'non-zero bitmap on a compressed cluster');
    const c = compressedFields(hi, lo, layout.clusterBits);
    const length = compressedLength(c);
    if (c.hostOffset < layout.clusterSize || c.hostOffset >= layout.fileSize || c.hostOffset + length - layout.fileSize >= layout.clusterSize) {
      throw new FormatError(FORMAT, 'compressed cluster offset', c.hostOffset, `${length} bytes from there are not inside the file (${where()})`);
    }
    return { type: 'compressed', host: c.hostOffset, length };
  }
  if (l2ReservedBits(hi, lo)) {
    throw new FormatError(FORMAT, 'L2 entry', where(), `reserved bits set (0x${(decodeL2Entry(hi, lo, layout.clusterBits) as StandardL2Entry).reserved.toString(16)})`);
  }
  const offset = entryOffset(hi, lo);
  const hasHost = offset !== 0 || (external && isCopied(hi));
  if (hasHost) {
    if (external) {
      if (offset !== guest) {
        throw new FormatError(FORMAT, 'data cluster offset', offset, `must equal the guest offset ${guest} in an external data file (${where()})`);
      }
    } else {
      requireHostCluster(layout, 'data cluster offset', offset, where);
    }
  }
  if (layout.extendedL2) {
    // Bit 0 carries no meaning with extended L2 (QEMU ignores it); the bitmap decides.
    if (hasHost && zeroBits & allocBits) {
      throw new FormatError(FORMAT, 'subcluster bitmap', where(), `subclusters both allocated and zero (0x${zeroBits.toString(16)}/0x${allocBits.toString(16)})`);
    }
    if (!hasHost && allocBits) throw new FormatError(FORMAT, 'subcluster bitmap', where(), 'allocated subclusters in a cluster without a host offset');
    return hasHost ? { type: 'subclusters', host: offset, alloc: allocBits, zero: zeroBits } : { type: 'subclusters', alloc: 0, zero: zeroBits };
  }
  if (isZeroFlag(lo)) {
    if (layout.header.version < 3) throw new FormatError(FORMAT, 'L2 entry', where(), 'zero flag in a version 2 image (QEMU marks it corrupt)');
    // QEMU tests the zero flag first: offset 0 is ZERO_PLAIN even with COPIED in a data-file image.
    return offset !== 0 ? { type: 'zeroAlloc', host: offset } : { type: 'zero' };
  }
  return hasHost ? { type: 'normal', host: offset } : { type: 'unallocated' };
}

export const QUICK_UNALLOCATED = 0;
export const QUICK_ZERO = 1;

/**
 * classifyL2 for the common standard entries (no extended L2, no external data file), without an
 * object: 0 unallocated, 1 zero without a host, h > 1 data at host h, −h preallocated zero at host h
 * (hosts are non-zero cluster multiples); NaN for everything else — compressed entries, reserved bits,
 * the zero flag in v2, a host that is misaligned or past the end — which classifyL2 must judge.
 */
export function quickL2(hi: number, lo: number, cs: number, fileSize: number, v3: boolean): number {
  if ((hi | lo) === 0) return QUICK_UNALLOCATED;
  // Not compressed, no reserved bits, the zero flag only in v3.
  if ((hi & 0x7f000000) !== 0 || (lo & 0x1fe) !== 0 || (!v3 && (lo & 1) !== 0)) return NaN;
  const offset = (hi & 0x00ffffff) * 0x1_0000_0000 + ((lo & 0xfffffe00) >>> 0);
  if (offset === 0) return (lo & 1) !== 0 ? QUICK_ZERO : QUICK_UNALLOCATED;
  if (offset % cs !== 0 || offset >= fileSize) return NaN;
  return (lo & 1) !== 0 ? -offset : offset;
}

/** Pushes one guest cluster [guest, guest+len) of the given state. */
function pushCluster(map: ExtentMap, layout: Qcow2Layout, s: ClusterState, guest: number, len: number): void {
  switch (s.type) {
    case 'unallocated':
      map.push({ guest, length: len, kind: 'unallocated' });
      return;
    case 'zero':
      map.push({ guest, length: len, kind: 'zero' });
      return;
    case 'zeroAlloc':
      map.push({ guest, length: len, kind: 'zero', host: s.host });
      return;
    case 'normal':
      map.push({ guest, length: len, kind: 'data', host: s.host });
      return;
    case 'compressed':
      map.push({ guest, length: len, kind: 'compressed', host: s.host, hostLength: s.length });
      return;
    case 'subclusters': {
      const sc = layout.clusterSize / SUBCLUSTERS;
      for (let i = 0; i < SUBCLUSTERS && i * sc < len; i++) {
        const bit = 1 << i;
        const g = guest + i * sc;
        const l = Math.min(sc, len - i * sc);
        if (s.zero & bit) map.push({ guest: g, length: l, kind: 'zero', ...(s.host !== undefined ? { host: s.host + i * sc } : {}) });
        else if (s.alloc & bit) map.push({ guest: g, length: l, kind: 'data', host: s.host! + i * sc });
        // Not yet written, so it reads the backing file; qemu-img map still shows where it would be.
        else map.push({ guest: g, length: l, kind: 'unallocated', ...(s.host !== undefined ? { host: s.host + i * sc } : {}) });
      }
    }
  }
}

/** The guest → host mapping of the active layer. */
export async function activeMapping(layout: Qcow2Layout): Promise<ExtentMap> {
  const { virtualSize: vs, clusterSize: cs, l2Entries } = layout;
  const map = new ExtentMap(vs);
  const coverage = cs * l2Entries;
  const needed = Math.ceil(vs / coverage);
  const l1 = await readL1(layout, layout.header.l1TableOffset, layout.header.l1Size, 'l1_size', 'l1_table_offset');
  // Standard entries of the common kinds are classified inline and coalesced into runs here (a 1 TiB
  // image has 16 million of them); anything else — compressed, extended L2, an external data file, and
  // every entry that breaks a rule — goes through classifyL2, which throws the precise error.
  const fast = !layout.extendedL2 && layout.dataFileName === undefined;
  const v3 = layout.header.version >= 3;
  const fileSize = layout.fileSize;
  let runKind: 'data' | 'zero' | 'unallocated' | undefined;
  let runGuest = 0;
  let runLength = 0;
  let runHost = NaN;
  const flush = () => {
    if (runKind !== undefined) map.append(runGuest, runLength, runKind, runHost);
    runKind = undefined;
  };
  const add = (kind: 'data' | 'zero' | 'unallocated', guest: number, len: number, host: number) => {
    if (runKind === kind && (host !== host ? runHost !== runHost : runHost + runLength === host)) {
      runLength += len;
      return;
    }
    flush();
    runKind = kind;
    runGuest = guest;
    runLength = len;
    runHost = host;
  };
  // The previous entry's halves while it extends the current run (prevHi −1: no such entry), and the
  // host the next cluster of that run would have.
  let prevHi = -1;
  let prevLo = 0;
  let nextHost = 0;
  await forEachL2(
    layout,
    needed,
    (i) => l1EntryL2Offset(layout, l1, i, 'L1'),
    (i, l2Offset, l2) => {
      const base = i * coverage;
      if (!l2) {
        prevHi = -1;
        add('unallocated', base, Math.min(coverage, vs - base), NaN);
        return;
      }
      for (let j = 0; j < l2Entries; j++) {
        const guest = base + j * cs;
        if (guest >= vs) break;
        const len = Math.min(cs, vs - guest);
        if (fast) {
          const hi = l2.getUint32(j * 8);
          const lo = l2.getUint32(j * 8 + 4);
          // The next cluster of a run with a host: the same flags, the offset one cluster on (no carry
          // into the high half); quickL2 would give the previous answer one cluster on, and add() would
          // extend the run with it, if it still lies inside the file.
          if (hi === prevHi && lo === prevLo + cs && nextHost < fileSize) {
            prevLo = lo;
            nextHost += cs;
            runLength += len;
            continue;
          }
          prevHi = -1;
          const q = quickL2(hi, lo, cs, fileSize, v3);
          if (q === QUICK_UNALLOCATED) add('unallocated', guest, len, NaN);
          else if (q === QUICK_ZERO) add('zero', guest, len, NaN);
          else if (q > 0) add('data', guest, len, q);
          else if (q < 0) add('zero', guest, len, -q);
          if (q > 1 || q < 0) {
            prevHi = hi;
            prevLo = lo;
            nextHost = (q > 0 ? q : -q) + cs;
          }
          if (q === q) continue;
        }
        prevHi = -1;
        flush();
        pushCluster(map, layout, classifyL2(layout, l2, j, guest, l2Offset), guest, len);
      }
    },
  );
  flush();
  return map;
}
