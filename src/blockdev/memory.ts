/**
 * In-memory BlockDevice, sparse by pages so a "1 TiB" test image costs only what is written. It is
 * the base for the recording, crashing and faulting devices used by the tests.
 */
import type { BlockDevice } from './types.js';

const PAGE = 65536;

export class MemoryBlockDevice implements BlockDevice {
  private pages = new Map<number, Uint8Array>();
  private length: number;
  writable = true;

  constructor(
    readonly path = 'memory',
    initial?: Uint8Array,
  ) {
    this.length = 0;
    if (initial) {
      this.writeSync(initial, 0);
    }
  }

  static from(bytes: Uint8Array, path = 'memory'): MemoryBlockDevice {
    return new MemoryBlockDevice(path, bytes);
  }

  async size(): Promise<number> {
    return this.length;
  }

  sizeSync(): number {
    return this.length;
  }

  async allocated(): Promise<number> {
    return this.pages.size * PAGE;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    return this.readSync(buf, offset);
  }

  readSync(buf: Uint8Array, offset: number): number {
    const n = Math.max(0, Math.min(buf.length, this.length - offset));
    let done = 0;
    while (done < n) {
      const pos = offset + done;
      const pno = Math.floor(pos / PAGE);
      const within = pos - pno * PAGE;
      const take = Math.min(PAGE - within, n - done);
      const page = this.pages.get(pno);
      if (page) buf.set(page.subarray(within, within + take), done);
      else buf.fill(0, done, done + take);
      done += take;
    }
    return n;
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.writeSync(buf, offset);
  }

  writeSync(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const pno = Math.floor(pos / PAGE);
      const within = pos - pno * PAGE;
      const take = Math.min(PAGE - within, buf.length - done);
      let page = this.pages.get(pno);
      if (!page) {
        page = new Uint8Array(PAGE);
        this.pages.set(pno, page);
      }
      page.set(buf.subarray(done, done + take), within);
      done += take;
    }
    this.length = Math.max(this.length, offset + buf.length);
  }

  async flush(): Promise<void> {}

  async truncate(length: number): Promise<void> {
    if (length < this.length) {
      for (const pno of [...this.pages.keys()]) {
        if (pno * PAGE >= length) this.pages.delete(pno);
      }
      const last = this.pages.get(Math.floor(length / PAGE));
      if (last) last.fill(0, length % PAGE);
    }
    this.length = length;
  }

  async punchHole(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.length);
    for (let pos = offset; pos < end; ) {
      const pno = Math.floor(pos / PAGE);
      const within = pos - pno * PAGE;
      const take = Math.min(PAGE - within, end - pos);
      if (take === PAGE) this.pages.delete(pno);
      else this.pages.get(pno)?.fill(0, within, within + take);
      pos += take;
    }
  }

  async nextData(offset: number): Promise<number | null> {
    // At or past the end there is no data (as lseek(SEEK_DATA) answers ENXIO), even inside the last page.
    if (offset >= this.length) return null;
    const first = Math.floor(offset / PAGE);
    let best: number | null = null;
    for (const pno of this.pages.keys()) if (pno >= first && (best === null || pno < best)) best = pno;
    if (best === null || best * PAGE >= this.length) return null;
    return Math.max(offset, best * PAGE);
  }

  async nextHole(offset: number): Promise<number> {
    let pno = Math.floor(offset / PAGE);
    while (pno * PAGE < this.length && this.pages.has(pno)) pno++;
    return Math.min(Math.max(offset, pno * PAGE), this.length);
  }

  async close(): Promise<void> {}

  /** A full copy of the contents (for assertions). */
  snapshot(): Uint8Array {
    const out = new Uint8Array(this.length);
    this.readSync(out, 0);
    return out;
  }
}
