/**
 * The structural check, counted as qemu-img check counts it for QED (block/qed-check.c, read-only
 * mode): every cluster may be referenced once; invalid table and data offsets are corruptions; an
 * L2 table whose clusters are already referenced is not descended; clusters past the header area and
 * below the file size rounded down to a cluster that nothing references are leaks, counted only when
 * every table could be read. allocated/fragmented/total clusters follow qed-check's statistics: every
 * non-zero, non-1 L2 entry is "allocated" (valid or not), and one is "fragmented" when it does not
 * follow the previous allocated entry of the same L2 table.
 *
 * One deliberate difference: qed.h qed_bytes_to_clusters divides by cluster_size − 1, so QEMU's leak
 * count includes floor(N / (cluster_size − 1)) clusters that do not exist (N = whole clusters in the
 * file): from 16 MiB files with 4 KiB clusters, 4 GiB with 64 KiB. Here clusters are counted exactly.
 * QEMU sets no image-end-offset for QED, and neither does this check.
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { CheckReport } from '../../src/driver.js';
import { ImgconvError, formatValue } from '../../src/errors.js';
import { QED, type QedGeometry } from './header.js';
import { l1EntryField, l2EntryField } from './layout.js';
import { QED_ZERO_CLUSTER, clusterOffsetProblem, forEachEntry, forEachRun, l1EntryProblem } from './tables.js';

/** Messages beyond this many are summarised in one line (a garbage table can hold millions). */
const MAX_MESSAGES = 1000;

class ClusterBitmap {
  private bits: Uint8Array;
  constructor(readonly count: number) {
    this.bits = new Uint8Array(Math.ceil(count / 8));
  }
  test(i: number): boolean {
    return (this.bits[i >>> 3]! & (1 << (i & 7))) !== 0;
  }
  set(i: number): void {
    this.bits[i >>> 3]! |= 1 << (i & 7);
  }
  /** Whether none of clusters [i, i+n) is marked. */
  clear(i: number, n: number): boolean {
    const end = i + n;
    for (; i < end && (i & 7) !== 0; i++) if (this.test(i)) return false;
    for (; i + 8 <= end; i += 8) if (this.bits[i >>> 3] !== 0) return false;
    for (; i < end; i++) if (this.test(i)) return false;
    return true;
  }
  /** Marks clusters [i, i+n). */
  setRange(i: number, n: number): void {
    const end = i + n;
    for (; i < end && (i & 7) !== 0; i++) this.set(i);
    if (i + 8 <= end) {
      const whole = (end - i) >>> 3;
      this.bits.fill(0xff, i >>> 3, (i >>> 3) + whole);
      i += whole * 8;
    }
    for (; i < end; i++) this.set(i);
  }
}

export async function checkQed(dev: BlockDevice, g: QedGeometry): Promise<CheckReport> {
  const cs = g.clusterSize;
  const nclusters = g.fileClustersEnd / cs;
  const used = new ClusterBitmap(nclusters);
  const report: CheckReport = {
    format: QED,
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    messages: [],
    totalClusters: Math.ceil(g.virtualSize / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
  };
  let dropped = 0;
  const say = (m: string) => {
    if (report.messages.length < MAX_MESSAGES) report.messages.push(m);
    else dropped++;
  };

  /** qed_set_used_clusters: marks n clusters; each one already marked is a corruption. */
  const markUsed = (offset: number, n: number, by: string | (() => string)): boolean => {
    let twice = 0;
    for (let c = offset / cs, k = 0; k < n; k++, c++) {
      if (used.test(c)) {
        twice++;
        say(`ERROR cluster ${c} (offset ${formatValue(c * cs)}) is referenced more than once (again by ${typeof by === 'string' ? by : by()})`);
      }
      used.set(c);
    }
    report.corruptions += twice;
    return twice === 0;
  };

  /** A run of valid clusters none of which is referenced yet: marked at once (else false, nothing marked). */
  const markFree = (first: number, n: number): boolean => {
    if (!used.clear(first, n)) return false;
    used.setRange(first, n);
    return true;
  };

  let complete = true;
  const readFailed = (what: string, e: unknown) => {
    if (!(e instanceof ImgconvError)) throw e;
    report.checkErrors++;
    complete = false;
    say(`ERROR could not read ${what}: ${e.message}`);
  };

  markUsed(g.l1TableOffset, g.tableSize, 'the L1 table');
  const l2Offsets: { l1Index: number; offset: number }[] = [];
  try {
    await forEachEntry(dev, g.l1TableOffset, g.tableBytes, (i, value, big) => {
      const problem = l1EntryProblem(g, value, big);
      if (problem) {
        report.corruptions++;
        say(`ERROR ${l1EntryField(i)} = ${formatValue(big ?? value)}: ${problem}`);
      } else {
        l2Offsets.push({ l1Index: i, offset: value });
      }
    });
  } catch (e) {
    readFailed('the L1 table', e);
  }

  for (const t of l2Offsets) {
    if (!markUsed(t.offset, g.tableSize, `the L2 table of L1 entry ${t.l1Index}`)) continue;
    let lastOffset = 0;
    try {
      const entry = (j: number, value: number, big?: bigint) => {
        const problem = clusterOffsetProblem(g, value, big);
        if (problem) {
          report.corruptions++;
          say(`ERROR ${l2EntryField(t.l1Index, j)} = ${formatValue(big ?? value)}: ${problem}`);
          return;
        }
        markUsed(value, 1, () => l2EntryField(t.l1Index, j));
      };
      await forEachRun(dev, t.offset, g.tableBytes, cs, (j, count, value, big) => {
        if (value === QED_ZERO_CLUSTER && big === undefined) return;
        // Allocated entries; within a run each follows the previous one, so only its first can be fragmented.
        report.allocatedClusters! += count;
        if (lastOffset !== 0 && lastOffset + cs !== value) report.fragmentedClusters!++;
        lastOffset = value + (count - 1) * cs;
        if (count > 1 && value % cs === 0 && value >= g.headerBytes && value + count * cs <= g.fileClustersEnd && markFree(value / cs, count)) return;
        for (let k = 0; k < count; k++) entry(j + k, value + k * cs, big);
      });
    } catch (e) {
      readFailed(`the L2 table of L1 entry ${t.l1Index} at ${formatValue(t.offset)}`, e);
    }
  }

  // qed_check_for_leaks runs only after a complete scan.
  if (complete) {
    let runStart = -1;
    const endRun = (end: number) => {
      if (runStart < 0) return;
      const n = end - runStart;
      say(
        n === 1
          ? `Leaked cluster ${runStart} (offset ${formatValue(runStart * cs)}): nothing references it`
          : `Leaked clusters ${runStart}-${end - 1} (offset ${formatValue(runStart * cs)}, ${n} clusters): nothing references them`,
      );
      runStart = -1;
    };
    for (let c = g.headerSize; c < nclusters; c++) {
      if (used.test(c)) {
        endRun(c);
      } else {
        report.leaks++;
        if (runStart < 0) runStart = c;
      }
    }
    endRun(nclusters);
  }
  if (dropped > 0) report.messages.push(`... and ${dropped} more messages`);
  return report;
}
