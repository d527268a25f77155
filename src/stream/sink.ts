/**
 * Sinks a stream is written into: a Node writable (stdout) with backpressure, a counter (measure),
 * a BlockDevice written front to back (tests, library use), and a coalescing layer that turns the
 * many small pieces of some layouts (VMDK markers, one-sector tables) into large writes.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { IoError } from '../errors.js';
import type { StreamSink } from './types.js';

/** Shared and never written to: zero runs are handed out as views of it. */
const ZERO = new Uint8Array(1 << 20);

/** Appends zeros through `write` in pieces of the shared zero buffer. */
async function writeZeros(write: (b: Uint8Array) => Promise<void>, length: number): Promise<void> {
  for (let left = length; left > 0; ) {
    const n = Math.min(left, ZERO.length);
    await write(ZERO.subarray(0, n));
    left -= n;
  }
}

/**
 * A Node writable (process.stdout): waits for 'drain' whenever write() says its buffer is full, so
 * memory stays at the stream's high-water mark whatever the speed of the reader. An error on the
 * stream (EPIPE when the reader went away) fails the next write with an IoError.
 */
export class WritableSink implements StreamSink {
  position = 0;
  private failure: Error | undefined;

  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly name = 'stdout',
  ) {
    out.on('error', (e: Error) => {
      this.failure ??= e;
    });
  }

  private fail(): never {
    const e = this.failure as NodeJS.ErrnoException;
    const why = e.code === 'EPIPE' ? 'the reading side closed the pipe' : e.message;
    throw new IoError('write', this.name, this.position, e.code, why);
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (this.failure) this.fail();
    if (bytes.length === 0) return;
    this.position += bytes.length;
    if (this.out.write(bytes)) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        this.out.off('drain', done);
        this.out.off('error', done);
        resolve();
      };
      this.out.on('drain', done);
      this.out.on('error', done);
    });
    if (this.failure) this.fail();
  }

  zeros(length: number): Promise<void> {
    return writeZeros((b) => this.write(b), length);
  }

  /** Resolves once everything written so far has left the process's buffers. */
  async flush(): Promise<void> {
    if (this.failure) this.fail();
    await new Promise<void>((resolve) => this.out.write(new Uint8Array(0), () => resolve()));
    if (this.failure) this.fail();
  }
}

/** Counts bytes and keeps none (measure). */
export class CountingSink implements StreamSink {
  position = 0;
  async write(bytes: Uint8Array): Promise<void> {
    this.position += bytes.length;
  }
  async zeros(length: number): Promise<void> {
    this.position += length;
  }
}

/** Writes the stream into a BlockDevice from offset `start`; zero runs are left as holes. */
export class DeviceSink implements StreamSink {
  private written = 0;

  constructor(
    private readonly dev: BlockDevice,
    private readonly start = 0,
  ) {}

  get position(): number {
    return this.written;
  }

  async write(bytes: Uint8Array): Promise<void> {
    await this.dev.write(bytes, this.start + this.written);
    this.written += bytes.length;
  }

  async zeros(length: number): Promise<void> {
    this.written += length;
  }

  /** Sets the device's length to what was streamed (trailing zero runs included). */
  async finish(): Promise<void> {
    if ((await this.dev.size()) < this.start + this.written) await this.dev.truncate(this.start + this.written);
  }
}

/**
 * Gathers writes smaller than `chunk` into one buffer of `chunk` bytes, handed on when full; larger
 * writes pass through (after what is gathered). Call `flush()` at the end.
 */
export class CoalescingSink implements StreamSink {
  private pending: Uint8Array;
  private used = 0;
  private flushed = 0;

  constructor(
    private readonly inner: StreamSink,
    private readonly chunk = 1 << 20,
  ) {
    this.pending = new Uint8Array(chunk);
  }

  get position(): number {
    return this.flushed + this.used;
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (bytes.length >= this.chunk / 4) {
      await this.flush();
      await this.inner.write(bytes);
      this.flushed += bytes.length;
      return;
    }
    let at = 0;
    while (at < bytes.length) {
      const n = Math.min(bytes.length - at, this.chunk - this.used);
      this.pending.set(bytes.subarray(at, at + n), this.used);
      this.used += n;
      at += n;
      if (this.used === this.chunk) await this.flush();
    }
  }

  async zeros(length: number): Promise<void> {
    if (length >= this.chunk / 4) {
      await this.flush();
      await this.inner.zeros(length);
      this.flushed += length;
      return;
    }
    let left = length;
    while (left > 0) {
      // The pending buffer is fresh (zero-filled) past `used`: zeros only advance.
      const n = Math.min(left, this.chunk - this.used);
      this.used += n;
      left -= n;
      if (this.used === this.chunk) await this.flush();
    }
  }

  /** Hands on what is gathered (in a buffer the inner sink then owns). */
  async flush(): Promise<void> {
    if (this.used === 0) return;
    const out = this.pending.subarray(0, this.used);
    this.flushed += this.used;
    this.pending = new Uint8Array(this.chunk);
    this.used = 0;
    await this.inner.write(out);
  }
}
