/**
 * A set of disjoint half-open byte ranges [start, end), kept sorted and merged: the relocation
 * planner's free space and scratch bookkeeping. Lookups are binary searches; updates splice, which is
 * linear in the number of ranges (free space fragments into about as many ranges as there are moves in
 * flight, not as many as there are units).
 */
export class IntervalSet {
  private starts: number[] = [];
  private ends: number[] = [];

  get count(): number {
    return this.starts.length;
  }

  /** Index of the last range starting at or before `at`, or -1. */
  private before(at: number): number {
    let lo = 0;
    let hi = this.starts.length - 1;
    let ans = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (this.starts[mid]! <= at) {
        ans = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return ans;
  }

  add(start: number, length: number): void {
    if (length <= 0) return;
    let s = start;
    let e = start + length;
    let i = this.before(s);
    if (i >= 0 && this.ends[i]! >= s) {
      s = this.starts[i]!;
      e = Math.max(e, this.ends[i]!);
    } else i++;
    let j = i;
    while (j < this.starts.length && this.starts[j]! <= e) {
      e = Math.max(e, this.ends[j]!);
      j++;
    }
    this.starts.splice(i, j - i, s);
    this.ends.splice(i, j - i, e);
  }

  remove(start: number, length: number): void {
    if (length <= 0) return;
    const e = start + length;
    let i = this.before(start);
    if (i < 0 || this.ends[i]! <= start) i++;
    const newStarts: number[] = [];
    const newEnds: number[] = [];
    let j = i;
    while (j < this.starts.length && this.starts[j]! < e) {
      if (this.starts[j]! < start) {
        newStarts.push(this.starts[j]!);
        newEnds.push(start);
      }
      if (this.ends[j]! > e) {
        newStarts.push(e);
        newEnds.push(this.ends[j]!);
      }
      j++;
    }
    this.starts.splice(i, j - i, ...newStarts);
    this.ends.splice(i, j - i, ...newEnds);
  }

  /** True when [start, start+length) lies wholly inside one range. */
  contains(start: number, length: number): boolean {
    const i = this.before(start);
    return i >= 0 && this.ends[i]! >= start + length;
  }

  /** True when [start, start+length) shares a byte with some range. */
  intersects(start: number, length: number): boolean {
    if (length <= 0) return false;
    const i = this.before(start + length - 1);
    return i >= 0 && this.ends[i]! > start;
  }

  /** The lowest `align`-aligned offset ≥ from where `length` bytes fit in one range. */
  firstFit(from: number, length: number, align: number): number {
    let i = Math.max(0, this.before(from));
    for (; i < this.starts.length; i++) {
      const s = Math.ceil(Math.max(this.starts[i]!, from) / align) * align;
      if (s + length <= this.ends[i]!) return s;
    }
    throw new Error(`no free range of ${length} bytes from ${from}`);
  }

  ranges(): { start: number; length: number }[] {
    return this.starts.map((s, i) => ({ start: s, length: this.ends[i]! - s }));
  }
}
