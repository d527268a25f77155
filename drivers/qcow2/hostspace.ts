/**
 * Everything a qcow2 file holds, by host range: cluster 0 (header), the refcount structures, the
 * active and snapshot L1/L2 tables, the snapshot table, bitmaps, the LUKS header, and data. Internal
 * snapshots share L2 tables and data clusters with the active layer (refcount > 1), so a cluster a
 * previous layer already recorded is skipped; a cluster referenced twice within one layer is not,
 * and HostSpace then reports the overlap. Metadata occupies whole clusters (that is what the
 * refcounts account for); compressed payloads are byte ranges that may share sectors.
 */
import { alignUp } from '../../src/binary.js';
import { readAt } from '../../src/blockdev/types.js';
import { FormatError } from '../../src/errors.js';
import { HostSpace } from '../../src/host-space.js';
import {
  BME_MAX_TABLE_SIZE,
  bitmapTableEntryOffset,
  bitmapTableEntryProblem,
  decodeBitmapDirectory,
  dirEntryProblem,
} from './bitmaps.js';
import { decodeReftableEntry } from './entries.js';
import { FORMAT, validateTable } from './header.js';
import type { Qcow2Layout } from './open.js';
import { classifyL2, forEachL2, l1EntryL2Offset, quickL2, readL1, requireHostCluster } from './tables.js';

/** Per-cluster marks over the file: clusters earlier layers recorded, and those of the current one. */
class LayerMarks {
  private prev: Uint8Array;
  private cur: Uint8Array;
  constructor(
    clusters: number,
    private readonly clusterSize: number,
  ) {
    this.prev = new Uint8Array(Math.ceil(clusters / 8));
    this.cur = new Uint8Array(this.prev.length);
  }
  /** True when an earlier layer recorded the cluster at `offset`; otherwise marks it for this layer. */
  sharedWithEarlierLayer(offset: number): boolean {
    const k = offset / this.clusterSize;
    const byte = k >>> 3;
    const bit = 1 << (k & 7);
    if (this.prev[byte]! & bit) return true;
    this.cur[byte] = this.cur[byte]! | bit;
    return false;
  }
  endLayer(): void {
    for (let i = 0; i < this.prev.length; i++) this.prev[i] = this.prev[i]! | this.cur[i]!;
    this.cur.fill(0);
  }
}

export async function buildHostSpace(layout: Qcow2Layout): Promise<HostSpace> {
  const { header: h, clusterSize: cs, dev } = layout;
  const whole = (bytes: number) => alignUp(bytes, cs);
  const hs = new HostSpace(FORMAT, layout.fileSize);
  hs.add(0, cs, 'header', 'header');

  hs.add(h.refcountTableOffset, h.refcountTableClusters * cs, 'metadata', 'refcount table');
  const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
  const rdv = new DataView(reftable.buffer);
  for (let i = 0; i < reftable.length / 8; i++) {
    const e = decodeReftableEntry(rdv.getUint32(i * 8), rdv.getUint32(i * 8 + 4));
    if (e.reserved) throw new FormatError(FORMAT, 'refcount table entry', i, `reserved bits set (0x${e.reserved.toString(16)})`);
    if (e.offset === 0) continue;
    requireHostCluster(layout, 'refcount block offset', e.offset, () => `refcount table entry ${i}`);
    hs.add(e.offset, cs, 'metadata', 'refcount block');
  }

  if (h.nbSnapshots > 0) hs.add(h.snapshotsOffset, whole(layout.snapshotTableSize), 'metadata', 'snapshot table');
  if (layout.crypto) hs.add(layout.crypto.offset, whole(layout.crypto.length), 'metadata', 'LUKS header');
  if (layout.bitmaps) await addBitmaps(layout, hs);

  if (layout.dataFileName !== undefined && layout.snapshots.length > 0) {
    throw new FormatError(FORMAT, 'nb_snapshots', layout.snapshots.length, 'internal snapshots in an image with an external data file');
  }
  const marks = layout.snapshots.length > 0 ? new LayerMarks(Math.ceil(layout.fileSize / cs), cs) : undefined;
  if (h.l1Size > 0) hs.add(h.l1TableOffset, whole(h.l1Size * 8), 'metadata', 'L1 table');
  await addLayer(layout, hs, h.l1TableOffset, h.l1Size, 'L1', ['l1_size', 'l1_table_offset'], marks);
  for (const s of layout.snapshots) {
    const name = `snapshot ${JSON.stringify(s.id)} L1`;
    if (s.l1Size === 0) continue;
    hs.add(s.l1TableOffset, whole(s.l1Size * 8), 'metadata', 'snapshot L1 table');
    await addLayer(layout, hs, s.l1TableOffset, s.l1Size, name, ['snapshot l1_size', 'snapshot l1_table_offset'], marks);
  }
  hs.finish(); // overlaps surface here, as a FormatError from hostSpace()
  return hs;
}

async function addLayer(
  layout: Qcow2Layout,
  hs: HostSpace,
  l1Offset: number,
  l1Size: number,
  table: string,
  fields: [string, string],
  marks: LayerMarks | undefined,
): Promise<void> {
  const cs = layout.clusterSize;
  const coverage = cs * layout.l2Entries;
  const l1 = await readL1(layout, l1Offset, l1Size, ...fields);
  const external = layout.dataFileName !== undefined;
  const fast = !layout.extendedL2 && !external && marks === undefined;
  const v3 = layout.header.version >= 3;
  await forEachL2(
    layout,
    l1Size,
    (i) => l1EntryL2Offset(layout, l1, i, table),
    (i, l2Offset, l2) => {
      if (!l2 || marks?.sharedWithEarlierLayer(l2Offset)) return;
      hs.add(l2Offset, cs, 'metadata', 'L2 table');
      // Back-to-back clusters of the same kind are added as one range (what HostSpace.add would merge
      // them into anyway), so a table of 8,192 contiguous entries costs one call, not 8,192.
      let runStart = 0;
      let runEnd = 0;
      let runZero = false;
      const endRun = () => {
        if (runEnd > runStart) hs.add(runStart, runEnd - runStart, 'data', runZero ? 'preallocated zero' : 'data');
        runEnd = runStart;
      };
      // The previous entry's halves while it extends the current run (prevHi −1: no such entry).
      let prevHi = -1;
      let prevLo = 0;
      const fileSize = layout.fileSize;
      for (let j = 0; j < layout.l2Entries; j++) {
        if (fast) {
          const hi = l2.getUint32(j * 8);
          const lo = l2.getUint32(j * 8 + 4);
          // The next cluster of the run: the same flags, the offset one cluster on (no carry into the
          // high half), so quickL2 would accept it as the previous one if it still lies inside the file.
          if (hi === prevHi && lo === prevLo + cs && runEnd < fileSize) {
            prevLo = lo;
            runEnd += cs;
            continue;
          }
          prevHi = -1;
          // Standard entries of the common kinds without an object each (classifyL2 judges the rest).
          const q = quickL2(hi, lo, cs, fileSize, v3);
          if (q === q) {
            if (q > 1 || q < 0) {
              const host = q > 1 ? q : -q;
              if (host !== runEnd || q < 0 !== runZero || runEnd === runStart) {
                endRun();
                runStart = host;
                runEnd = host;
                runZero = q < 0;
              }
              runEnd += cs;
              prevHi = hi;
              prevLo = lo;
            }
            continue;
          }
          endRun();
        }
        const s = classifyL2(layout, l2, j, i * coverage + j * cs, l2Offset);
        if (s.type === 'compressed') {
          hs.add(s.host, s.length, 'data', 'compressed data', true);
        } else if ((s.type === 'normal' || s.type === 'zeroAlloc' || (s.type === 'subclusters' && s.host !== undefined)) && !external) {
          const host = s.host!;
          if (marks?.sharedWithEarlierLayer(host)) continue;
          hs.add(host, cs, 'data', s.type === 'zeroAlloc' ? 'preallocated zero' : 'data');
        }
      }
      endRun();
    },
  );
  marks?.endLayer();
}

async function addBitmaps(layout: Qcow2Layout, hs: HostSpace): Promise<void> {
  const b = layout.bitmaps!;
  const cs = layout.clusterSize;
  hs.add(b.directoryOffset, alignUp(b.directorySize, cs), 'metadata', 'bitmap directory');
  const dir = decodeBitmapDirectory(await readAt(layout.dev, b.directoryOffset, b.directorySize), b.nbBitmaps);
  for (const e of dir) {
    const problem = dirEntryProblem(e, cs);
    if (problem) throw new FormatError(FORMAT, 'bitmap directory entry', e.name, problem);
    validateTable('bitmap_table_size', 'bitmap_table_offset', e.tableOffset, e.tableSize, 8, BME_MAX_TABLE_SIZE * 8, cs, layout.fileSize);
    hs.add(e.tableOffset, alignUp(e.tableSize * 8, cs), 'metadata', 'bitmap table');
    const table = await readAt(layout.dev, e.tableOffset, e.tableSize * 8);
    const dv = new DataView(table.buffer);
    for (let i = 0; i < e.tableSize; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      const p = bitmapTableEntryProblem(hi, lo, cs);
      if (p) throw new FormatError(FORMAT, 'bitmap table entry', `${e.name}[${i}]`, p);
      const off = bitmapTableEntryOffset(hi, lo);
      if (off === 0) continue;
      requireHostCluster(layout, 'bitmap data offset', off, () => `bitmap ${JSON.stringify(e.name)} entry ${i}`);
      hs.add(off, cs, 'metadata', 'bitmap data');
    }
  }
}
