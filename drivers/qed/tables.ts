/**
 * L1 and L2 tables: table_size clusters of little-endian u64 entries. In an L1 table an entry is 0
 * (no L2 table) or the offset of an L2 table; in an L2 table 0 is unallocated (read the backing file),
 * 1 is a zero cluster, anything else the offset of a data cluster (qed_spec.rst "Table").
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import { readAt } from '../../src/blockdev/types.js';
import { MAX_SAFE, view } from '../../src/binary.js';
import { formatValue } from '../../src/errors.js';
import type { QedGeometry } from './header.js';

/** L2 entry value of a zero cluster (qed.h qed_offset_is_zero_cluster). */
export const QED_ZERO_CLUSTER = 1;

export function decodeTable(bytes: Uint8Array): bigint[] {
  const dv = view(bytes);
  const out: bigint[] = [];
  for (let i = 0; i + 8 <= bytes.length; i += 8) out.push(dv.getBigUint64(i, true));
  return out;
}

/** Entries beyond `entries.length` are 0; `bytes` is the table's size (table_size · cluster_size). */
export function encodeTable(entries: readonly bigint[], bytes: number): Uint8Array {
  const buf = new Uint8Array(bytes);
  const dv = view(buf);
  entries.forEach((e, i) => dv.setBigUint64(i * 8, e, true));
  return buf;
}

/**
 * One non-zero entry. `value` is exact up to 2^53; above that `big` holds the stored value (such an
 * offset lies past any file, so it is only ever reported).
 */
export type EntryVisitor = (index: number, value: number, big?: bigint) => void;

/** Table reads go in pieces so a 1 GiB table (64 MiB clusters × 16) never sits in memory whole. */
const CHUNK = 1 << 20;

/**
 * Calls `visit` for every non-zero entry of the table at `offset`, in index order. Pieces of the table
 * that lie in a file hole are skipped without reading: they are all zeros.
 */
export async function forEachEntry(dev: BlockDevice, offset: number, bytes: number, visit: EntryVisitor): Promise<void> {
  for (let pos = 0; pos < bytes; pos += CHUNK) {
    const len = Math.min(CHUNK, bytes - pos);
    const data = await dev.nextData(offset + pos);
    if (data === null || data >= offset + pos + len) continue;
    const buf = await readAt(dev, offset + pos, len);
    const dv = view(buf);
    const first = pos / 8;
    for (let b = 0; b < len; b += 8) {
      const lo = dv.getUint32(b, true);
      const hi = dv.getUint32(b + 4, true);
      if ((lo | hi) === 0) continue;
      const value = hi * 0x1_0000_0000 + lo;
      if (value > MAX_SAFE) visit(first + b / 8, value, (BigInt(hi) << 32n) | BigInt(lo));
      else visit(first + b / 8, value);
    }
  }
}

/**
 * A run of `count` non-zero entries from `index`: entry `index + k` holds `value + k · step`, where
 * step is 0 for a run of zero-cluster markers (value 1) and `clusterSize` otherwise (data clusters
 * lying back to back). `big` is set for a single entry above 2^53 (count 1).
 */
export type RunVisitor = (index: number, count: number, value: number, big?: bigint) => void;

/**
 * forEachEntry by runs: the same entries, in index order, with neighbours that continue each other
 * (the next host cluster, or another zero-cluster marker) given as one call. Cost per entry is a few
 * integer operations, so a 1 TiB image's 16 million entries scan in tens of milliseconds; callers work
 * per run. Runs do not cross the 1 MiB pieces the table is read in.
 */
export async function forEachRun(dev: BlockDevice, offset: number, bytes: number, clusterSize: number, visit: RunVisitor): Promise<void> {
  // One buffer for every piece (a scan of a 1 TiB image reads 128 MiB of tables: no allocation each).
  const buf = new Uint8Array(Math.min(CHUNK, bytes));
  // Entries as u32 halves: a typed-array view on little-endian hosts, a DataView elsewhere.
  const words = LITTLE_ENDIAN ? new Uint32Array(buf.buffer, 0, buf.length >>> 2) : undefined;
  const dv = view(buf);
  for (let pos = 0; pos < bytes; pos += CHUNK) {
    const len = Math.min(CHUNK, bytes - pos);
    // A table of several pieces skips those in a file hole without reading them (all zeros); a table
    // of one piece is read at once — asking where the data lies would cost more than reading it.
    if (bytes > CHUNK) {
      const data = await dev.nextData(offset + pos);
      if (data === null || data >= offset + pos + len) continue;
    }
    let got = 0;
    while (got < len) {
      const n = await dev.read(buf.subarray(got, len), offset + pos + got);
      if (n === 0) break;
      got += n;
    }
    buf.fill(0, got, len); // past the end of the file: zeros, as readAt gives
    const first = pos / 8;
    let runIndex = -1;
    let runCount = 0;
    let runValue = 0;
    let next = -1; // the value that would continue the current run
    for (let w = 0; w < len >>> 2; w += 2) {
      const lo = words ? words[w]! : dv.getUint32(w * 4, true);
      const hi = words ? words[w + 1]! : dv.getUint32(w * 4 + 4, true);
      if ((lo | hi) === 0) {
        if (runCount > 0) visit(runIndex, runCount, runValue);
        runCount = 0;
        continue;
      }
      if (hi >= 0x20_0000) {
        // Above 2^53: reported alone, with the exact stored value.
        if (runCount > 0) visit(runIndex, runCount, runValue);
        runCount = 0;
        visit(first + (w >>> 1), 1, hi * 0x1_0000_0000 + lo, (BigInt(hi) << 32n) | BigInt(lo));
        continue;
      }
      const value = hi * 0x1_0000_0000 + lo;
      if (runCount > 0 && value === next) {
        runCount++;
        if (value !== QED_ZERO_CLUSTER) next = value + clusterSize;
        continue;
      }
      if (runCount > 0) visit(runIndex, runCount, runValue);
      runIndex = first + (w >>> 1);
      runCount = 1;
      runValue = value;
      next = value === QED_ZERO_CLUSTER ? QED_ZERO_CLUSTER : value + clusterSize;
    }
    if (runCount > 0) visit(runIndex, runCount, runValue);
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Why `offset` cannot be a cluster of this image, or null when it can: the rule of qed.h
 * qed_check_cluster_offset — cluster-aligned, past the header area, below the file size rounded
 * down to a cluster.
 */
export function clusterOffsetProblem(g: QedGeometry, offset: number, big?: bigint): string | null {
  if (big !== undefined || offset >= g.fileClustersEnd) {
    return `points at or past the end of the last whole cluster of the file (${formatValue(g.fileClustersEnd)}; file is ${g.fileSize} bytes)`;
  }
  if (offset % g.clusterSize !== 0) return `is not a multiple of the cluster size ${g.clusterSize}`;
  if (offset < g.headerBytes) return `points into the header area (first ${g.headerBytes} bytes)`;
  return null;
}

/** qed.h qed_check_table_offset: the first and the last cluster of the table must be valid clusters. */
export function tableOffsetProblem(g: QedGeometry, offset: number, big?: bigint): string | null {
  const first = clusterOffsetProblem(g, offset, big);
  if (first) return first;
  if (offset + g.tableBytes > g.fileClustersEnd) {
    return `the ${g.tableBytes}-byte table runs past the last whole cluster of the file (${formatValue(g.fileClustersEnd)}; file is ${g.fileSize} bytes)`;
  }
  return null;
}

/** An L1 entry is an L2 table offset; 1, the zero-cluster marker, has no meaning there. */
export function l1EntryProblem(g: QedGeometry, value: number, big?: bigint): string | null {
  if (value === QED_ZERO_CLUSTER) return 'the zero-cluster marker 1 is valid only in L2 tables; an L1 entry is 0 or an L2 table offset';
  return tableOffsetProblem(g, value, big);
}
