/**
 * The grain directory → grain table → grain walk [LVM "Grain directory", QEMU get_cluster_offset]:
 * one pass over the tables yields the guest mapping, the host ranges of every table and marker, and
 * the list of problems. `mapping()` throws the first problem; `check()` counts them all.
 */
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import { FormatError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { FORMAT, SECTOR, type SparseGeometry } from './header.js';
import { decodeGrainMarker, GRAIN_MARKER_BYTES } from './markers.js';

/** GTE value meaning "reads as zeros" when FLAG_ZERO_GRAIN is set (VMDK_GTE_ZEROED). */
export const GTE_ZEROED = 1;

export interface TableRange {
  start: number;
  length: number;
  what: string;
}

export interface WalkResult {
  map: ExtentMap;
  /** Grain tables (and redundant ones), grain markers. */
  tables: TableRange[];
  /** Every problem found, in walk order; mapping() throws problems[0]. */
  problems: FormatError[];
  /** Markers whose LBA disagrees with the grain's guest sector (streamOptimized); counted by check only. */
  lbaMismatches: string[];
  dataGrains: number;
  compressedGrains: number;
  zeroGrains: number;
}

export async function readU32Table(dev: BlockDevice, offset: number, entries: number): Promise<Uint32Array> {
  const bytes = await readAt(dev, offset, entries * 4);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Uint32Array(entries);
  for (let i = 0; i < entries; i++) out[i] = dv.getUint32(i * 4, true);
  return out;
}

/**
 * Walks one grain directory. `stop` makes the walk end at the first problem (mapping); otherwise
 * bad entries become unallocated runs and the walk goes on (check).
 */
export async function walkGrainDirectory(
  dev: BlockDevice,
  g: SparseGeometry,
  gd: Uint32Array,
  fileSize: number,
  stop: boolean,
): Promise<WalkResult> {
  const map = new ExtentMap(g.virtualSize);
  const res: WalkResult = { map, tables: [], problems: [], lbaMismatches: [], dataGrains: 0, compressedGrains: 0, zeroGrains: 0 };
  const problem = (e: FormatError): boolean => {
    res.problems.push(e);
    return stop;
  };
  const seenTables = new Map<number, number>();
  for (let i = 0; i < gd.length; i++) {
    const guestStart = i * g.gtCoverage;
    const guestEnd = Math.min(g.virtualSize, guestStart + g.gtCoverage);
    const gde = gd[i]!;
    if (gde === 0) {
      map.fillTo(guestEnd, 'unallocated');
      continue;
    }
    const gtAt = gde * SECTOR;
    if (gtAt + g.gtBytes > fileSize) {
      if (problem(new FormatError(FORMAT, `grain directory entry ${i}`, gde, `its grain table (${g.gtBytes} bytes at sector ${gde}) runs past the end of the file (${fileSize} bytes)`))) return res;
      map.fillTo(guestEnd, 'unallocated');
      continue;
    }
    const prev = seenTables.get(gtAt);
    if (prev !== undefined) {
      // Writes through one entry would change the other's guest range: never legitimate.
      if (problem(new FormatError(FORMAT, `grain directory entry ${i}`, gde, `points at the same grain table as entry ${prev}`))) return res;
      map.fillTo(guestEnd, 'unallocated');
      continue;
    }
    seenTables.set(gtAt, i);
    res.tables.push({ start: gtAt, length: g.gtBytes, what: 'grain table' });
    const gt = await readU32Table(dev, gtAt, g.gtesPerGt);
    for (let j = 0; j < g.gtesPerGt; j++) {
      const guest = guestStart + j * g.grainBytes;
      if (guest >= g.virtualSize) break; // entries past the capacity are never read (partial last GT)
      const length = Math.min(g.grainBytes, g.virtualSize - guest);
      const gte = gt[j]!;
      if (gte === 0) {
        map.push({ guest, length, kind: 'unallocated' });
        continue;
      }
      if (gte === GTE_ZEROED && g.zeroedGrain) {
        map.push({ guest, length, kind: 'zero' });
        res.zeroGrains++;
        continue;
      }
      const host = gte * SECTOR;
      const field = `grain table entry ${i}/${j}`;
      if (host >= fileSize) {
        // QEMU's check: "cluster offset for sector N points after EOF".
        if (problem(new FormatError(FORMAT, field, gte, `the grain for guest offset ${guest} starts past the end of the file (${fileSize} bytes)`))) return res;
        map.push({ guest, length, kind: 'unallocated' });
        continue;
      }
      if (!g.compressed) {
        map.push({ guest, length, kind: 'data', host });
        res.dataGrains++;
        continue;
      }
      if (host + GRAIN_MARKER_BYTES > fileSize) {
        if (problem(new FormatError(FORMAT, field, gte, 'the grain marker runs past the end of the file'))) return res;
        map.push({ guest, length, kind: 'unallocated' });
        continue;
      }
      const marker = decodeGrainMarker(await readAt(dev, host, GRAIN_MARKER_BYTES));
      // QEMU vmdk_read_extent reads two grains and refuses a size of 0 or beyond them.
      if (marker.size === 0 || marker.size > 2 * g.grainBytes - GRAIN_MARKER_BYTES) {
        if (problem(new FormatError(FORMAT, `grain marker size (${field})`, marker.size, `must be 1 to ${2 * g.grainBytes - GRAIN_MARKER_BYTES} bytes`))) return res;
        map.push({ guest, length, kind: 'unallocated' });
        continue;
      }
      const payload = host + GRAIN_MARKER_BYTES;
      if (payload + marker.size > fileSize) {
        if (problem(new FormatError(FORMAT, `grain marker size (${field})`, marker.size, `the compressed grain at ${payload} runs past the end of the file (${fileSize} bytes)`))) return res;
        map.push({ guest, length, kind: 'unallocated' });
        continue;
      }
      if (marker.lba !== BigInt(guest / SECTOR)) {
        res.lbaMismatches.push(`grain marker at ${host} says LBA ${marker.lba}, but grain table entry ${i}/${j} maps guest sector ${guest / SECTOR}`);
      }
      res.tables.push({ start: host, length: GRAIN_MARKER_BYTES, what: 'grain marker' });
      map.push({ guest, length, kind: 'compressed', host: payload, hostLength: marker.size });
      res.compressedGrains++;
    }
    map.fillTo(guestEnd, 'unallocated');
  }
  map.fillTo(g.virtualSize, 'unallocated');
  return res;
}
