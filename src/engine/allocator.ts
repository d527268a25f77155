/**
 * Host-space allocation for new structures: first fit in the source's free gaps (space no live source
 * structure uses, and outside the target's fixed regions), then past the end of everything. Writing
 * there before the commit point cannot change what the source image reads.
 */
import type { Allocator } from '../driver.js';
import type { FreeRange } from '../host-space.js';
import { alignUp } from '../binary.js';

export class GapAllocator implements Allocator {
  private gaps: FreeRange[];
  private tail: number;
  /** Every range handed out, for accounting. */
  readonly given: FreeRange[] = [];

  constructor(free: FreeRange[], reserved: FreeRange[], end: number) {
    this.gaps = subtract(free, reserved);
    this.tail = Math.max(end, ...reserved.map((r) => r.start + r.length));
  }

  get end(): number {
    return this.tail;
  }

  alloc(length: number, align: number): number {
    if (length <= 0) throw new Error(`alloc of ${length} bytes`);
    for (let i = 0; i < this.gaps.length; i++) {
      const g = this.gaps[i]!;
      const start = alignUp(g.start, align);
      if (start + length <= g.start + g.length) {
        const rest: FreeRange[] = [];
        if (start > g.start) rest.push({ start: g.start, length: start - g.start });
        if (start + length < g.start + g.length) rest.push({ start: start + length, length: g.start + g.length - start - length });
        this.gaps.splice(i, 1, ...rest);
        this.given.push({ start, length });
        return start;
      }
    }
    const start = alignUp(this.tail, align);
    this.tail = start + length;
    this.given.push({ start, length });
    return start;
  }
}

/** free minus reserved, both sorted lists of ranges. */
export function subtract(free: FreeRange[], reserved: FreeRange[]): FreeRange[] {
  let out = free.map((f) => ({ ...f }));
  for (const r of reserved) {
    const next: FreeRange[] = [];
    for (const f of out) {
      const fEnd = f.start + f.length;
      const rEnd = r.start + r.length;
      if (rEnd <= f.start || r.start >= fEnd) {
        next.push(f);
        continue;
      }
      if (r.start > f.start) next.push({ start: f.start, length: r.start - f.start });
      if (rEnd < fEnd) next.push({ start: rEnd, length: fEnd - rEnd });
    }
    out = next;
  }
  return out;
}
