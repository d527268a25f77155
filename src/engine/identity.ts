/**
 * Identity placement (targets whose format is the guest bytes themselves: raw, VHD fixed). What has
 * to happen before the commit, planned here without I/O:
 * - every data unit of the source moves to host = guest (relocate.ts), keeping the source valid;
 * - the source's headers and tables that lie inside the disk's range stay (pinned); the guest bytes of
 *   those ranges — and of units that cannot reach their place because it overlaps a pinned structure —
 *   go into the commit record and are written at the commit point;
 * - the rest of the disk's range that reads as zeros is punched (it is free by then).
 * The file is then truncated to the target's length after verification (reclaim).
 */
import type { SourceImage, TargetPlan } from '../driver.js';
import { UnsupportedError } from '../errors.js';
import { ExtentMap } from '../extent-map.js';
import type { FreeRange, HostSpace } from '../host-space.js';
import { IntervalSet } from './intervals.js';
import { DEFAULT_WINDOW, planRelocation, scratchBaseFor, type RelocationPlan, type Unit } from './relocate.js';

/**
 * The source's data cannot be moved to its identity place inside this format (no relocatable units, or
 * compressed data): the conversion can still go through an intermediate format that can (convert.ts
 * chooses one from the registry).
 */
export class NeedsIntermediateError extends UnsupportedError {}

export interface IdentityPlan {
  units: Unit[];
  relocation: RelocationPlan;
  /** Host (= guest) ranges whose bytes the commit record carries. */
  redo: FreeRange[];
  /** Ranges inside the disk that must read zeros and are free once the data has moved: punched before the commit. */
  punch: FreeRange[];
  /** What the target must read: data at host = guest, zeros elsewhere. */
  expected: ExtentMap;
}

/** Data at host = guest where the source has data, zeros elsewhere. */
export function identityMapping(map: ExtentMap): ExtentMap {
  const out = new ExtentMap(map.virtualSize);
  for (const e of map) {
    if (e.kind === 'data' || e.kind === 'compressed') out.push({ guest: e.guest, length: e.length, kind: 'data', host: e.guest });
    else out.push({ guest: e.guest, length: e.length, kind: 'zero' });
  }
  return out;
}

export async function planIdentity(
  source: SourceImage,
  mapping: ExtentMap,
  hostSpace: HostSpace,
  fileLength: number,
  targetPlan: TargetPlan,
  to: string,
  /** Most bytes of second copies (and of scratch) on disk at once: a round's size (ConvertOptions.relocationWindow). */
  window: number = DEFAULT_WINDOW,
): Promise<IdentityPlan> {
  const from = source.format;
  const V = mapping.virtualSize;
  const misplaced: { guest: number; length: number; kind: string }[] = [];
  for (const e of mapping) {
    if (e.kind === 'compressed') {
      throw new NeedsIntermediateError(from, 'compressed data', `${to} needs every guest byte at its own file offset, and compressed data cannot be relocated inside a ${from} image`);
    }
    if (e.kind === 'data' && e.host !== e.guest) misplaced.push(e);
  }
  const units: Unit[] = [];
  if (misplaced.length > 0) {
    if (!source.relocatable) {
      throw new NeedsIntermediateError(
        from,
        'data placement',
        `${to} needs every guest byte at its own file offset, and imgconv cannot move data inside a ${from} image (guest ${misplaced[0]!.guest}+${misplaced[0]!.length} lies elsewhere)`,
      );
    }
    for (const r of await source.relocatable(0, 0)) {
      if (r.guest === undefined) throw new Error(`${from}: relocatable data unit at ${r.host} without a guest offset`);
      units.push({ ...r, guest: r.guest });
    }
    requireUnitsCover(from, mapping, units);
  }
  // Pinned: everything live that is not a unit and not data already at its identity place.
  const live = new IntervalSet();
  for (const r of hostSpace.ranges()) live.add(r.start, r.length);
  for (const u of units) live.remove(u.host, u.length);
  for (const e of mapping) if (e.kind === 'data' && e.host === e.guest) live.remove(e.host, e.length);
  const pinned = live.ranges();
  const alignment = source.relocationAlignment ?? 512;
  const fixedEnds = targetPlan.fixedRegions.map((r) => r.start + r.length);
  const unitEnds = units.map((u) => Math.max(u.host, u.guest) + u.length);
  const scratchBase = scratchBaseFor([fileLength, hostSpace.usedEnd(), V, ...fixedEnds, ...unitEnds], alignment);
  const relocation = planRelocation({ units, pinned, virtualSize: V, scratchBase, alignment, window });

  const redo = new IntervalSet();
  for (const p of pinned) if (p.start < V) redo.add(p.start, Math.min(p.length, V - p.start));
  for (const i of relocation.parked) {
    const u = units[i]!;
    if (u.guest < V) redo.add(u.guest, Math.min(u.length, V - u.guest));
  }
  const punch = new IntervalSet();
  for (const e of mapping) if (e.kind !== 'data') punch.add(e.guest, e.length);
  for (const r of redo.ranges()) punch.remove(r.start, r.length);
  return { units, relocation, redo: redo.ranges(), punch: punch.ranges(), expected: identityMapping(mapping) };
}

/**
 * Every data byte of the mapping must belong to exactly one unit that says the same host. One walk over
 * the units and the runs, both in guest order (a range lookup per unit took 70 ms of a 1 GiB QED plan).
 */
function requireUnitsCover(from: string, mapping: ExtentMap, units: Unit[]): void {
  const runs = [...mapping];
  const V = mapping.virtualSize;
  let covered = 0;
  let k = 0;
  for (const u of units.slice().sort((a, b) => a.guest - b.guest)) {
    const end = Math.min(u.guest + u.length, V);
    while (k < runs.length && runs[k]!.guest + runs[k]!.length <= u.guest) k++;
    for (let j = k; j < runs.length && runs[j]!.guest < end; j++) {
      const e = runs[j]!;
      const s = Math.max(e.guest, u.guest);
      const host = e.host === undefined ? undefined : e.host + (s - e.guest);
      if (e.kind !== 'data' || host !== u.host + (s - u.guest)) {
        throw new Error(`${from}: relocatable unit guest ${u.guest} at ${u.host} disagrees with the mapping (${e.kind} at ${host})`);
      }
      covered += Math.min(e.guest + e.length, end) - s;
    }
  }
  let data = 0;
  for (const e of runs) if (e.kind === 'data') data += e.length;
  if (covered !== data) throw new Error(`${from}: relocatable units cover ${covered} of ${data} data bytes`);
}
