/**
 * The collapsed view of a backing chain: which guest bytes hold data once every layer is looked
 * through. A streamed image is standalone (no backing file), so a top layer's unallocated range
 * shows whatever its backing file has there, and zero runs — in any layer — are simply no data.
 * Built from the layers' ExtentMaps alone; memory grows with data runs, not with clusters.
 */
import type { ExtentMap } from '../extent-map.js';

/** Index ranges [first, end) of the units (clusters, blocks, grains) that hold any data. */
export interface UnitRuns {
  unit: number;
  /** Flattened pairs: first0, end0, first1, end1, … ascending and never adjacent. */
  ranges: number[];
  /** Units with data. */
  count: number;
}

export class DataRuns {
  /** Flattened pairs start0, end0, … ascending, disjoint and never adjacent. */
  private readonly bounds: number[];

  constructor(
    readonly virtualSize: number,
    pairs: Iterable<readonly [number, number]> = [],
  ) {
    this.bounds = [];
    for (const [s, e] of pairs) this.add(s, e);
  }

  /** The data of a chain: `maps[0]` is the top layer, `maps[i+1]` the backing file of `maps[i]`. */
  static fromChain(maps: readonly ExtentMap[]): DataRuns {
    const top = maps[0];
    if (!top) throw new Error('DataRuns.fromChain: empty chain');
    const out = new DataRuns(top.virtualSize);
    const walk = (layer: number, start: number, end: number): void => {
      const map = maps[layer];
      if (!map) return; // below the chain: zeros
      const stop = Math.min(end, map.virtualSize); // past a shorter backing file: zeros
      if (stop <= start) return;
      for (const e of map.range(start, stop - start)) {
        if (e.kind === 'data' || e.kind === 'compressed') out.add(e.guest, e.guest + e.length);
        else if (e.kind === 'unallocated') walk(layer + 1, e.guest, e.guest + e.length);
      }
    };
    walk(0, 0, top.virtualSize);
    return out;
  }

  /** Appends [start, end); runs must come in ascending order (adjacent ones merge). */
  add(start: number, end: number): void {
    if (end <= start) return;
    const n = this.bounds.length;
    if (n > 0) {
      const lastEnd = this.bounds[n - 1]!;
      if (start < lastEnd) throw new Error(`DataRuns.add: ${start} before the end of the previous run (${lastEnd})`);
      if (start === lastEnd) {
        this.bounds[n - 1] = end;
        return;
      }
    }
    this.bounds.push(start, end);
  }

  get runCount(): number {
    return this.bounds.length / 2;
  }

  /** Guest bytes with data. */
  get bytes(): number {
    let sum = 0;
    for (let i = 0; i < this.bounds.length; i += 2) sum += this.bounds[i + 1]! - this.bounds[i]!;
    return sum;
  }

  *[Symbol.iterator](): IterableIterator<[number, number]> {
    for (let i = 0; i < this.bounds.length; i += 2) yield [this.bounds[i]!, this.bounds[i + 1]!];
  }

  /** The units of `unit` bytes (from guest offset 0) that hold any data byte. */
  units(unit: number): UnitRuns {
    const ranges: number[] = [];
    let count = 0;
    for (let i = 0; i < this.bounds.length; i += 2) {
      const first = Math.floor(this.bounds[i]! / unit);
      const end = Math.ceil(this.bounds[i + 1]! / unit);
      const n = ranges.length;
      if (n > 0 && first <= ranges[n - 1]!) {
        // Shares a unit with the previous run (or touches it): one range.
        count += end - ranges[n - 1]!;
        ranges[n - 1] = end;
      } else {
        ranges.push(first, end);
        count += end - first;
      }
    }
    return { unit, ranges, count };
  }
}

/** Iterates the unit indexes of a UnitRuns in ascending order, range by range. */
export function* unitRanges(u: UnitRuns): IterableIterator<[number, number]> {
  for (let i = 0; i < u.ranges.length; i += 2) yield [u.ranges[i]!, u.ranges[i + 1]!];
}
