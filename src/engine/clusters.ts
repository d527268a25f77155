/**
 * Cluster view of a mapping, for targets that map whole clusters (qcow2, QED, VMDK grains). For a
 * candidate cluster size it says, run by run, which target clusters can point at their data where it
 * lies and which must move — misaligned data, data under the target's fixed regions, compressed data,
 * clusters that mix data with zeros at a finer granularity — so a target can pick the cluster size
 * that moves the fewest bytes. Works in runs: cost is linear in the mapping's runs, not in clusters.
 */
import type { ExtentMap } from '../extent-map.js';

export type ClusterKind = 'data' | 'zero' | 'unallocated';

export interface ClusterRun {
  /** Guest offset, a multiple of the cluster size. */
  guest: number;
  /** Bytes (whole clusters, but for a partial last cluster at the virtual end). */
  length: number;
  kind: ClusterKind;
  /** Data: host offset of the first cluster, a multiple of the cluster size. */
  host?: number;
}

export interface MustMove {
  guest: number;
  length: number;
  reason: string;
}

export interface Clusterized {
  clusterSize: number;
  runs: ClusterRun[];
  mustMove: MustMove[];
  moveBytes: number;
}

export interface ClusterizeOptions {
  /** Host ranges no data may stay in (the target's fixed regions). */
  reserved?: { start: number; length: number }[];
  /** With a backing file, unallocated reads the backing file and cannot share a cluster with zeros. */
  hasBacking?: boolean;
  /**
   * Alignment a data cluster's host offset needs: the cluster size for qcow2/QED (the default), 512
   * for sector-addressed targets (VMDK grains only need contiguous bytes starting on a sector).
   */
  hostAlignment?: number;
}

export function clusterize(map: ExtentMap, cs: number, opts: ClusterizeOptions = {}): Clusterized {
  const runs: ClusterRun[] = [];
  const mustMove: MustMove[] = [];
  const reserved = opts.reserved ?? [];
  const vsize = map.virtualSize;
  const pushRun = (r: ClusterRun) => {
    const p = runs[runs.length - 1];
    if (p && p.kind === r.kind && p.guest + p.length === r.guest && (r.kind !== 'data' || p.host! + p.length === r.host)) p.length += r.length;
    else runs.push(r);
  };
  const move = (guest: number, length: number, reason: string) => {
    const p = mustMove[mustMove.length - 1];
    if (p && p.reason === reason && p.guest + p.length === guest) p.length += length;
    else mustMove.push({ guest, length, reason });
  };
  const underReserved = (host: number, length: number) => reserved.some((r) => host < r.start + r.length && r.start < host + length);

  let i = 0;
  let pos = 0;
  while (pos < vsize) {
    while (map.at(i).guest + map.at(i).length <= pos) i++;
    const e = map.at(i);
    const eEnd = e.guest + e.length;
    const cEnd = Math.min(pos + cs, vsize);
    if (eEnd >= cEnd) {
      // Whole clusters inside one run: [pos, batchEnd)
      const batchEnd = eEnd >= vsize ? vsize : pos + Math.floor((eEnd - pos) / cs) * cs;
      const length = batchEnd - pos;
      if (e.kind === 'zero' || e.kind === 'unallocated') {
        pushRun({ guest: pos, length, kind: e.kind });
      } else if (e.kind === 'compressed') {
        move(pos, length, 'compressed data is stored decompressed');
      } else {
        const host = e.host! + (pos - e.guest);
        if (host % (opts.hostAlignment ?? cs) !== 0) {
          move(pos, length, `data not aligned to ${opts.hostAlignment ?? cs} bytes`);
        } else if (underReserved(host, Math.ceil(length / cs) * cs)) {
          // Split arithmetically: only the clusters that meet a reserved range move.
          let g = pos;
          for (const r of [...reserved].sort((x, y) => x.start - y.start)) {
            const a = Math.max(g, pos + Math.max(0, Math.floor((r.start - host) / cs) * cs));
            const b = Math.min(batchEnd, pos + Math.max(0, Math.ceil((r.start + r.length - host) / cs) * cs));
            if (a >= b) continue;
            if (a > g) pushRun({ guest: g, length: a - g, kind: 'data', host: host + (g - pos) });
            move(a, b - a, 'data lies where the new format keeps its header');
            g = b;
          }
          if (g < batchEnd) pushRun({ guest: g, length: batchEnd - g, kind: 'data', host: host + (g - pos) });
        } else {
          pushRun({ guest: pos, length, kind: 'data', host });
        }
      }
      pos = batchEnd;
      continue;
    }
    // A cluster that several runs share.
    const kinds = new Set<string>();
    for (let k = i; k < map.count; k++) {
      const r = map.at(k);
      if (r.guest >= cEnd) break;
      kinds.add(r.kind);
    }
    if (kinds.has('compressed')) move(pos, cEnd - pos, 'compressed data is stored decompressed');
    else if (kinds.has('data')) move(pos, cEnd - pos, `cluster mixes data with other content, or its data is not contiguous on the host, below ${cs} bytes`);
    else if (kinds.size === 1) pushRun({ guest: pos, length: cEnd - pos, kind: kinds.has('zero') ? 'zero' : 'unallocated' });
    // Zeros and unallocated together: both read zeros without a backing file. With one, the cluster
    // would have to be materialised from the backing file (the engine refuses that).
    else if (opts.hasBacking) move(pos, cEnd - pos, 'cluster mixes zeros and reads of the backing file (parent image)');
    else pushRun({ guest: pos, length: cEnd - pos, kind: 'zero' });
    pos = cEnd;
  }
  return { clusterSize: cs, runs, mustMove, moveBytes: mustMove.reduce((s, m) => s + m.length, 0) };
}

/** Power-of-two cluster sizes from `min` to `max`. */
export function powersOfTwo(min: number, max: number): number[] {
  const out: number[] = [];
  for (let c = min; c <= max; c *= 2) out.push(c);
  return out;
}

/**
 * The candidate that costs the least I/O — moved bytes count twice (read and write), new metadata
 * once — where costs within a slack of the cheapest count as equal; among those, the one that moves
 * the least data (counted in whole MiB), then the one closest to `preferred` (the format's default). The slack (1 MiB + 1/4096 of the
 * virtual size) keeps a small disk from getting 4 KiB clusters to save half a megabyte of tables,
 * while a raw disk of a terabyte still gets the cluster size that spares it gigabytes of L2 tables.
 */
export function cheapestClusterSize(
  candidates: { cs: number; moveBytes: number; metadataBytes: number }[],
  preferred: number,
  virtualSize = 0,
): number {
  const dist = (cs: number) => Math.abs(Math.log2(cs) - Math.log2(preferred));
  const cost = (c: { moveBytes: number; metadataBytes: number }) => 2 * c.moveBytes + c.metadataBytes;
  const min = Math.min(...candidates.map(cost));
  // Moving less than a mebibyte more is not worth a non-default size (a raw disk's header cluster).
  const movedMiB = (c: { moveBytes: number }) => Math.ceil(c.moveBytes / (1 << 20));
  const slack = costSlack(virtualSize);
  return candidates
    .filter((c) => cost(c) <= min + slack)
    .sort((a, b) => movedMiB(a) - movedMiB(b) || dist(a.cs) - dist(b.cs) || cost(a) - cost(b) || a.cs - b.cs)[0]!.cs;
}

/** Costs closer than this to the cheapest count as equal (see cheapestClusterSize). */
export function costSlack(virtualSize: number): number {
  return (1 << 20) + virtualSize / 4096;
}
