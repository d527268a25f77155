/**
 * A read-only view of a device with some byte ranges replaced, some ranges read as holes, and a
 * different length: how the image looked before the commit, rebuilt from the journal's undo bytes
 * (recovery opens the source format on it to know what the converted image must read); how a data file
 * will look once an adoption has punched its stale ranges (src/engine/adopt.ts plans the next step on it).
 */
import type { BlockDevice } from './types.js';
import { IoError } from '../errors.js';

export class OverlayDevice implements BlockDevice {
  readonly writable = false;
  constructor(
    private readonly inner: BlockDevice,
    private readonly patches: { offset: number; bytes: Uint8Array }[],
    private readonly length: number,
    /** Sorted, disjoint ranges that read as zeros and are holes (patches win over them). */
    private readonly holes: { start: number; length: number }[] = [],
  ) {}
  get path(): string {
    return this.inner.path;
  }
  async size(): Promise<number> {
    return this.length;
  }
  allocated(): Promise<number> {
    return this.inner.allocated();
  }
  async read(buf: Uint8Array, offset: number): Promise<number> {
    const n = Math.max(0, Math.min(buf.length, this.length - offset));
    if (n === 0) return 0;
    const view = buf.subarray(0, n);
    let got = 0;
    while (got < n) {
      const r = await this.inner.read(view.subarray(got), offset + got);
      if (r === 0) break;
      got += r;
    }
    view.fill(0, got);
    for (const h of this.holes) {
      const s = Math.max(offset, h.start);
      const e = Math.min(offset + n, h.start + h.length);
      if (s < e) view.fill(0, s - offset, e - offset);
    }
    for (const p of this.patches) {
      const s = Math.max(offset, p.offset);
      const e = Math.min(offset + n, p.offset + p.bytes.length);
      if (s < e) view.set(p.bytes.subarray(s - p.offset, e - p.offset), s - offset);
    }
    return n;
  }
  // With patches, everything is reported as data (a patch may cover a hole). Without them the view is the
  // device cut (or extended with zeros) at `length`, and the device's own holes show through — so a
  // verification of a large sparse raw result need not read every zero byte.
  async nextData(offset: number): Promise<number | null> {
    if (offset >= this.length) return null;
    if (this.patches.length > 0) return offset;
    let pos = offset;
    for (;;) {
      const d = await this.inner.nextData(pos);
      if (d === null || d >= this.length) return null;
      const h = this.holeAt(d);
      if (!h) return d;
      pos = h.start + h.length;
      if (pos >= this.length) return null;
    }
  }
  async nextHole(offset: number): Promise<number> {
    if (offset >= this.length || this.patches.length > 0) return Math.max(offset, this.length);
    if (this.holeAt(offset)) return offset;
    // Past the device's end (a view longer than the file) reads zeros: a hole right there.
    const h = Math.min(Math.max(await this.inner.nextHole(offset), offset), this.length);
    const next = this.holeAfter(offset);
    return next && next.start < h ? next.start : h;
  }
  /** The first of `holes` that ends after `pos`, if any (binary search: they are sorted and disjoint). */
  private holeAfter(pos: number): { start: number; length: number } | undefined {
    let lo = 0;
    let hi = this.holes.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const h = this.holes[mid]!;
      if (h.start + h.length <= pos) lo = mid + 1;
      else hi = mid;
    }
    return this.holes[lo];
  }
  private holeAt(pos: number): { start: number; length: number } | undefined {
    const h = this.holeAfter(pos);
    return h && h.start <= pos ? h : undefined;
  }
  private refuse(op: string): never {
    throw new IoError(op, this.path, 0, 'EROFS', 'read-only overlay');
  }
  async write(): Promise<void> {
    this.refuse('write');
  }
  async flush(): Promise<void> {}
  async truncate(): Promise<void> {
    this.refuse('truncate');
  }
  async punchHole(): Promise<void> {
    this.refuse('punch');
  }
  async close(): Promise<void> {}
}
