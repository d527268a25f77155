/**
 * HostSpace: what every byte range of the image file holds. Drivers record their structures
 * (headers, tables, data); everything else below the file size is free. This is the free-space
 * map the conversion engine allocates new metadata from, and the place where overlapping
 * structures — a classic hostile-input pattern — are caught.
 */
import { FormatError } from './errors.js';
import type { ExtentMap } from './extent-map.js';

/**
 * header: fixed-position structures (format header, footer, descriptor) that a target may claim.
 * metadata: tables that can live anywhere (L1/L2, refcounts, BAT, grain tables, bitmaps).
 * data: guest data.
 */
export type HostRole = 'header' | 'metadata' | 'data';

export interface HostRange {
  start: number;
  length: number;
  role: HostRole;
  /** What the range is, in the format's own words ("L2 table", "BAT", "grain table"). */
  what: string;
  /** Ranges that may legitimately overlap each other (compressed clusters sharing a sector). */
  shared?: boolean;
}

export interface FreeRange {
  start: number;
  length: number;
}

export class HostSpace {
  private pending: HostRange[] = [];
  private sorted: HostRange[] | null = null;

  constructor(
    readonly format: string,
    readonly fileSize: number,
  ) {}

  add(start: number, length: number, role: HostRole, what: string, shared = false): void {
    if (length <= 0) return;
    const last = this.pending[this.pending.length - 1];
    // Contiguous runs of the same thing collapse as they come (tables are often laid out in order).
    if (last && last.role === role && last.what === what && !shared && !last.shared && last.start + last.length === start) {
      last.length += length;
    } else {
      this.pending.push({ start, length, role, what, shared });
    }
    this.sorted = null;
  }

  /** Records every data (and preallocated-zero, and compressed) run of a mapping. */
  addMapping(map: ExtentMap): void {
    for (const e of map) {
      if (e.host === undefined) continue;
      if (e.kind === 'compressed') this.add(e.host, e.hostLength ?? 0, 'data', 'compressed data', true);
      else this.add(e.host, e.length, 'data', e.kind === 'zero' ? 'preallocated zero' : 'data');
    }
  }

  /**
   * Sorts and validates: two structures claiming the same byte are an error naming both.
   * Returns the ranges in host order, with adjacent identical neighbours merged.
   */
  finish(): HostRange[] {
    if (this.sorted) return this.sorted;
    const rs = this.pending.slice().sort((a, b) => a.start - b.start || a.length - b.length);
    const out: HostRange[] = [];
    let reach = -1;
    let reacher: HostRange | undefined;
    for (const r of rs) {
      if (reacher && r.start < reach && !(r.shared && reacher.shared)) {
        throw new FormatError(
          this.format,
          r.what,
          r.start,
          `overlaps ${reacher.what} at ${reacher.start} (+${reacher.length}); structures must not share host bytes`,
        );
      }
      const prev = out[out.length - 1];
      if (prev && prev.role === r.role && prev.what === r.what && prev.start + prev.length === r.start && !r.shared) {
        prev.length += r.length;
      } else {
        out.push({ ...r });
      }
      if (r.start + r.length > reach) {
        reach = r.start + r.length;
        reacher = r;
      }
    }
    this.sorted = out;
    return out;
  }

  ranges(): HostRange[] {
    return this.finish();
  }

  /** Gaps inside [0, fileSize) that no structure uses. */
  free(): FreeRange[] {
    const out: FreeRange[] = [];
    let pos = 0;
    for (const r of this.finish()) {
      if (r.start > pos) out.push({ start: pos, length: Math.min(r.start, this.fileSize) - pos });
      pos = Math.max(pos, r.start + r.length);
      if (pos >= this.fileSize) break;
    }
    if (pos < this.fileSize) out.push({ start: pos, length: this.fileSize - pos });
    return out.filter((f) => f.length > 0);
  }

  /** End of the last used byte (may exceed the file size by a partial cluster). */
  usedEnd(): number {
    let end = 0;
    for (const r of this.finish()) end = Math.max(end, r.start + r.length);
    return end;
  }

  /** Bytes used per role. */
  totals(): Record<HostRole, number> {
    const t: Record<HostRole, number> = { header: 0, metadata: 0, data: 0 };
    for (const r of this.finish()) t[r.role] += r.length;
    return t;
  }
}
