/**
 * ExtentMap: the guest → host mapping of one image layer, as runs in guest order covering
 * [0, virtualSize) without gaps. Adjacent runs of the same kind whose host offsets continue are
 * merged on insertion, so memory grows with the number of discontiguous runs, not with clusters
 * (a 1 TiB image whose data is contiguous is a handful of runs). Runs live in typed arrays: about
 * 33 bytes a run.
 */

export type ExtentKind = 'data' | 'zero' | 'unallocated' | 'compressed';

const KIND_CODES: readonly ExtentKind[] = ['data', 'zero', 'unallocated', 'compressed'];

export interface Extent {
  /** Guest byte offset. */
  guest: number;
  length: number;
  /**
   * data: the bytes are at `host` in the layer's data file.
   * zero: reads as zeros without consulting the backing file (`host` set when space is preallocated).
   * unallocated: not present in this layer; reads from the backing file, zeros when there is none
   *   (`host` set when space is already reserved for it, as for qcow2 extended-L2 subclusters).
   * compressed: one compressed cluster; `host` is the byte offset of its payload, `hostLength` its size.
   */
  kind: ExtentKind;
  host?: number;
  /** Compressed payload length in bytes (compressed extents only). */
  hostLength?: number;
}

export class ExtentMap {
  private guestA = new Float64Array(16);
  private lengthA = new Float64Array(16);
  private hostA = new Float64Array(16);
  private extraA = new Float64Array(16);
  private kindA = new Uint8Array(16);
  private n = 0;

  constructor(readonly virtualSize: number) {}

  get count(): number {
    return this.n;
  }

  /** Guest offset where the next run must start. */
  get end(): number {
    return this.n === 0 ? 0 : this.guestA[this.n - 1]! + this.lengthA[this.n - 1]!;
  }

  /**
   * Appends a run that starts exactly where the previous one ends. Zero-length runs are ignored.
   * Runs are merged when kind matches and the host side continues (or both have no host).
   */
  push(e: Extent): void {
    this.append(e.guest, e.length, e.kind, e.host ?? NaN, e.hostLength ?? NaN);
  }

  /**
   * push() without an object: `host` NaN when the run has none, `hostLength` NaN unless compressed.
   * Hot loops (table scans of millions of entries) call this with runs they have already coalesced.
   */
  append(guest: number, length: number, kind: ExtentKind, host: number, hostLength = NaN): void {
    if (length <= 0) return;
    const n = this.n;
    const end = n === 0 ? 0 : this.guestA[n - 1]! + this.lengthA[n - 1]!;
    if (guest !== end) throw new Error(`ExtentMap.push: run at ${guest} does not continue at ${end}`);
    if (guest + length > this.virtualSize) {
      throw new Error(`ExtentMap.push: run ${guest}+${length} passes the virtual size ${this.virtualSize}`);
    }
    const code = kind === 'data' ? 0 : kind === 'zero' ? 1 : kind === 'unallocated' ? 2 : kind === 'compressed' ? 3 : -1;
    if (code < 0) throw new Error(`ExtentMap.push: unknown kind ${String(kind)}`);
    if (n > 0 && code !== 3) {
      const i = n - 1;
      if (this.kindA[i] === code) {
        const prevHost = this.hostA[i]!;
        const continues = host !== host ? prevHost !== prevHost : prevHost === prevHost && prevHost + this.lengthA[i]! === host;
        if (continues) {
          this.lengthA[i] = this.lengthA[i]! + length;
          return;
        }
      }
    }
    if (n === this.guestA.length) this.grow();
    this.guestA[n] = guest;
    this.lengthA[n] = length;
    this.hostA[n] = host;
    this.extraA[n] = hostLength;
    this.kindA[n] = code;
    this.n = n + 1;
  }

  /** Appends a run of `kind` up to guest offset `to` (no-op when already there). */
  fillTo(to: number, kind: 'zero' | 'unallocated'): void {
    const end = this.end;
    if (to > end) this.append(end, to - end, kind, NaN);
  }

  /** Checks that the runs cover the whole virtual disk. */
  isComplete(): boolean {
    return this.end === this.virtualSize;
  }

  at(i: number): Extent {
    if (i < 0 || i >= this.n) throw new RangeError(`extent index ${i}`);
    const e: Extent = { guest: this.guestA[i]!, length: this.lengthA[i]!, kind: KIND_CODES[this.kindA[i]!]! };
    const h = this.hostA[i]!;
    if (!Number.isNaN(h)) e.host = h;
    const x = this.extraA[i]!;
    if (!Number.isNaN(x)) e.hostLength = x;
    return e;
  }

  *[Symbol.iterator](): IterableIterator<Extent> {
    for (let i = 0; i < this.n; i++) yield this.at(i);
  }

  /** Index of the run containing guest offset `g` (binary search), or -1 past the end. */
  indexOf(g: number): number {
    let lo = 0;
    let hi = this.n - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const s = this.guestA[mid]!;
      if (g < s) hi = mid - 1;
      else if (g >= s + this.lengthA[mid]!) lo = mid + 1;
      else return mid;
    }
    return -1;
  }

  /**
   * The runs overlapping [start, start+length), clipped to it. A clipped data run's host offset
   * moves with its start; a clipped compressed run keeps its payload (it must be read whole).
   */
  *range(start: number, length: number): IterableIterator<Extent & { within: number }> {
    const end = start + length;
    let i = this.indexOf(start);
    if (i < 0) return;
    for (; i < this.n; i++) {
      const e = this.at(i);
      if (e.guest >= end) break;
      const s = Math.max(e.guest, start);
      const t = Math.min(e.guest + e.length, end);
      const within = s - e.guest;
      const clipped: Extent & { within: number } = { ...e, guest: s, length: t - s, within };
      if (e.host !== undefined && e.kind !== 'compressed') clipped.host = e.host + within;
      yield clipped;
    }
  }

  /** Bytes of each kind. */
  totals(): Record<ExtentKind, number> {
    const t: Record<ExtentKind, number> = { data: 0, zero: 0, unallocated: 0, compressed: 0 };
    for (let i = 0; i < this.n; i++) t[KIND_CODES[this.kindA[i]!]!] += this.lengthA[i]!;
    return t;
  }

  /** Same runs, same kinds, same host offsets. */
  equals(other: ExtentMap): boolean {
    if (this.virtualSize !== other.virtualSize || this.n !== other.n) return false;
    for (let i = 0; i < this.n; i++) {
      const a = this.at(i);
      const b = other.at(i);
      if (a.guest !== b.guest || a.length !== b.length || a.kind !== b.kind || a.host !== b.host) return false;
      if (a.hostLength !== b.hostLength) return false;
    }
    return true;
  }

  toArray(): Extent[] {
    return [...this];
  }

  static fromArray(virtualSize: number, runs: Extent[]): ExtentMap {
    const m = new ExtentMap(virtualSize);
    for (const r of runs) m.push(r);
    return m;
  }

  private grow(): void {
    const cap = this.guestA.length * 2;
    const f = (a: Float64Array) => {
      const b = new Float64Array(cap);
      b.set(a);
      return b;
    };
    this.guestA = f(this.guestA);
    this.lengthA = f(this.lengthA);
    this.hostA = f(this.hostA);
    this.extraA = f(this.extraA);
    const k = new Uint8Array(cap);
    k.set(this.kindA);
    this.kindA = k;
  }
}
