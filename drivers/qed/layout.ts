/**
 * Walks the L1 table and every L2 table once and derives what the rest of the driver needs: the
 * guest → host ExtentMap, where the tables lie, the data clusters past the virtual size, feature
 * counts, and every invalid entry (kept, not thrown: open must succeed so that check() can count them
 * as qemu-img check does; mapping() and hostSpace() throw the first).
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import { FormatError, formatValue } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { QED, type QedGeometry } from './header.js';
import { QED_ZERO_CLUSTER, clusterOffsetProblem, forEachEntry, forEachRun, l1EntryProblem } from './tables.js';

export interface L2Table {
  /** The L1 entry that points at it. */
  l1Index: number;
  offset: number;
}

export interface HostRun {
  start: number;
  length: number;
}

export interface QedLayout {
  map: ExtentMap;
  /** Valid L2 tables, in L1 order. */
  l2Tables: L2Table[];
  /** Data clusters that L2 entries for guest offsets at or past the virtual size reference. */
  dataPastEnd: HostRun[];
  /** Data and zero entries that map guest clusters. */
  dataClusters: number;
  zeroClusters: number;
  /** The first invalid entries (at most MAX_KEPT_ERRORS), and how many there were in all. */
  errors: FormatError[];
  errorCount: number;
}

const MAX_KEPT_ERRORS = 100;

export function l1EntryField(i: number): string {
  return `L1 table entry ${i}`;
}

export function l2EntryField(l1Index: number, j: number): string {
  return `L2 table ${l1Index} entry ${j}`;
}

/** Sorted [start, end) of the L1 and the valid L2 tables, for "does this data cluster hit a table". */
class TableRanges {
  private starts: number[] = [];
  private ends: number[] = [];
  private names: string[] = [];

  constructor(ranges: { start: number; end: number; name: string }[]) {
    for (const r of [...ranges].sort((a, b) => a.start - b.start)) {
      this.starts.push(r.start);
      this.ends.push(r.end);
      this.names.push(r.name);
    }
  }

  /** The table that contains `offset`, if any (tables do not overlap once validated). */
  find(offset: number): string | undefined {
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (offset < this.starts[mid]!) hi = mid - 1;
      else if (offset >= this.ends[mid]!) lo = mid + 1;
      else return this.names[mid];
    }
    return undefined;
  }

  /** Whether any table overlaps [start, end). */
  overlaps(start: number, end: number): boolean {
    // The first table ending after `start` (tables are disjoint, so ends ascend with starts).
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid]! <= start) lo = mid + 1;
      else hi = mid;
    }
    return lo < this.starts.length && this.starts[lo]! < end;
  }
}

export async function scanLayout(dev: BlockDevice, g: QedGeometry): Promise<QedLayout> {
  const cs = g.clusterSize;
  const errors: FormatError[] = [];
  let errorCount = 0;
  const fail = (field: string, value: number | bigint, reason: string) => {
    errorCount++;
    if (errors.length < MAX_KEPT_ERRORS) errors.push(new FormatError(QED, field, value, reason));
  };

  // L1 entries first, so that every table is known before data entries are checked against them.
  const candidates: L2Table[] = [];
  await forEachEntry(dev, g.l1TableOffset, g.tableBytes, (i, value, big) => {
    const problem = l1EntryProblem(g, value, big);
    if (problem) fail(l1EntryField(i), big ?? value, problem);
    else candidates.push({ l1Index: i, offset: value });
  });

  // Two tables sharing clusters: qed-check marks the later one's clusters as referenced twice and
  // skips it; reading through it would mix table and data bytes, so it is invalid here. All tables
  // have the same size, so in offset order only the last accepted one can reach the next.
  const l1Range = { start: g.l1TableOffset, end: g.l1TableOffset + g.tableBytes, name: 'the L1 table' };
  const accepted = new Set<number>();
  let prev: L2Table | undefined;
  for (const t of [...candidates].sort((a, b) => a.offset - b.offset || a.l1Index - b.l1Index)) {
    if (t.offset < l1Range.end && t.offset + g.tableBytes > l1Range.start) {
      fail(l1EntryField(t.l1Index), t.offset, 'the L2 table overlaps the L1 table');
    } else if (prev && t.offset < prev.offset + g.tableBytes) {
      fail(l1EntryField(t.l1Index), t.offset, `the L2 table overlaps the L2 table of L1 entry ${prev.l1Index}`);
    } else {
      accepted.add(t.l1Index);
      prev = t;
    }
  }
  const l2Tables = candidates.filter((t) => accepted.has(t.l1Index));
  const tables = new TableRanges([
    l1Range,
    ...l2Tables.map((t) => ({ start: t.offset, end: t.offset + g.tableBytes, name: `the L2 table of L1 entry ${t.l1Index}` })),
  ]);

  const map = new ExtentMap(g.virtualSize);
  const dataPastEnd: HostRun[] = [];
  let dataClusters = 0;
  let zeroClusters = 0;
  const headerEnd = g.headerBytes;
  const fileEnd = g.fileClustersEnd;
  const vs = g.virtualSize;
  for (const t of l2Tables) {
    // Guest offsets of this table's entries; past the virtual size nothing is mapped, but the clusters
    // are still referenced (qed-check counts them) and so still occupy host space.
    const base = t.l1Index * g.l2Span;
    const inGuest = base < vs;
    /** One entry, every rule checked (runs with any problem come here, entry by entry). */
    const entry = (j: number, value: number, big?: bigint) => {
      const guest = inGuest ? base + j * cs : Infinity;
      if (value === QED_ZERO_CLUSTER) {
        if (guest < vs) {
          zeroClusters++;
          map.fillTo(guest, 'unallocated');
          map.append(guest, Math.min(cs, vs - guest), 'zero', NaN);
        }
        return;
      }
      const problem = clusterOffsetProblem(g, value, big) ?? intoTable(tables.find(value));
      if (problem) {
        fail(l2EntryField(t.l1Index, j), big ?? value, problem + (guest < vs ? ` (guest offset ${formatValue(guest)})` : ''));
        return;
      }
      if (guest < vs) {
        dataClusters++;
        map.fillTo(guest, 'unallocated');
        map.append(guest, Math.min(cs, vs - guest), 'data', value);
      } else {
        const last = dataPastEnd[dataPastEnd.length - 1];
        if (last && last.start + last.length === value) last.length += cs;
        else dataPastEnd.push({ start: value, length: cs });
      }
    };
    await forEachRun(dev, t.offset, g.tableBytes, cs, (j, count, value, big) => {
      if (big !== undefined || count === 1) return entry(j, value, big);
      // Entries mapping guest offsets below the virtual size, and the rest.
      const guest = inGuest ? base + j * cs : Infinity;
      const inside = guest >= vs ? 0 : Math.min(count, Math.ceil((vs - guest) / cs));
      if (value === QED_ZERO_CLUSTER) {
        if (inside > 0) {
          zeroClusters += inside;
          map.fillTo(guest, 'unallocated');
          map.append(guest, Math.min(inside * cs, vs - guest), 'zero', NaN);
        }
        return;
      }
      // A run of data clusters back to back: aligned, past the header area and inside the file as a
      // whole when its first and last cluster are, and clear of every table when no table overlaps it.
      const end = value + count * cs;
      if (value % cs !== 0 || value < headerEnd || end > fileEnd || tables.overlaps(value, end)) {
        for (let k = 0; k < count; k++) entry(j + k, value + k * cs);
        return;
      }
      if (inside > 0) {
        dataClusters += inside;
        map.fillTo(guest, 'unallocated');
        map.append(guest, Math.min(inside * cs, vs - guest), 'data', value);
      }
      if (inside < count) {
        const start = value + inside * cs;
        const length = (count - inside) * cs;
        const last = dataPastEnd[dataPastEnd.length - 1];
        if (last && last.start + last.length === start) last.length += length;
        else dataPastEnd.push({ start, length });
      }
    });
  }
  map.fillTo(g.virtualSize, 'unallocated');
  return { map, l2Tables, dataPastEnd, dataClusters, zeroClusters, errors, errorCount };
}

function intoTable(table: string | undefined): string | null {
  return table ? `points into ${table}` : null;
}
