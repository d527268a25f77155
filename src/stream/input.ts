/**
 * Reading a stream front to back: a SequentialInput over any async iterable of byte chunks (stdin),
 * and a read-only BlockDevice over such an input, so that a driver's own decoders can read a
 * stream's metadata as long as they ask for it in ascending order — what they read is kept, what
 * they skip is gone, and asking for skipped bytes is refused as a stream out of order.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { FormatError, IoError } from '../errors.js';
import type { SequentialInput } from './types.js';

export class ReadableInput implements SequentialInput {
  position = 0;
  private readonly iterator: AsyncIterator<Uint8Array | string>;
  private chunk: Uint8Array = new Uint8Array(0);
  private at = 0;
  private ended = false;
  /**
   * Sees every byte the stream delivers, in order, once (read or skipped): how a same-format copy
   * writes the stream out while a reader parses it. The bytes are only valid during the call.
   */
  tap: ((offset: number, bytes: Uint8Array) => Promise<void>) | undefined;

  constructor(
    source: AsyncIterable<Uint8Array | string>,
    /** Names the stream in messages ("qcow2 stream"). */
    private readonly label: string,
  ) {
    this.iterator = source[Symbol.asyncIterator]();
  }

  /** Makes the current chunk non-empty; false at the end of the stream. */
  private async fill(): Promise<boolean> {
    while (this.at >= this.chunk.length) {
      if (this.ended) return false;
      let r: IteratorResult<Uint8Array | string>;
      try {
        r = await this.iterator.next();
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        throw new IoError('read', 'stdin', this.position, err.code, err.message ?? String(e));
      }
      if (r.done) {
        this.ended = true;
        return false;
      }
      this.chunk = typeof r.value === 'string' ? Buffer.from(r.value, 'latin1') : r.value;
      this.at = 0;
    }
    return true;
  }

  /** Takes up to `n` bytes of the current chunk (a view, valid until the next call). */
  private async take(n: number): Promise<Uint8Array> {
    if (!(await this.fill())) return new Uint8Array(0);
    const k = Math.min(n, this.chunk.length - this.at);
    const view = this.chunk.subarray(this.at, this.at + k);
    this.at += k;
    const offset = this.position;
    this.position += k;
    if (this.tap) await this.tap(offset, view);
    return view;
  }

  async readUpTo(length: number): Promise<Uint8Array> {
    const first = await this.take(length);
    if (first.length === length || first.length === 0) return first.slice();
    // Gathered piece by piece: a damaged length field costs what the stream holds, not what it claims.
    const pieces = [first.slice()];
    let done = first.length;
    while (done < length) {
      const piece = await this.take(length - done);
      if (piece.length === 0) break;
      pieces.push(piece.slice());
      done += piece.length;
    }
    return Buffer.concat(pieces, done);
  }

  private ended_(what: string, got: number, wanted: number): FormatError {
    return new FormatError(this.label, what, this.position - got, `the stream ended after ${got} of its ${wanted} bytes (${this.position} bytes in all)`);
  }

  async read(length: number, what: string): Promise<Uint8Array> {
    const out = await this.readUpTo(length);
    if (out.length < length) throw this.ended_(what, out.length, length);
    return out;
  }

  async skip(length: number, what: string): Promise<void> {
    let done = 0;
    while (done < length) {
      const piece = await this.take(length - done);
      if (piece.length === 0) throw this.ended_(what, done, length);
      done += piece.length;
    }
  }

  /** Reads to the end of the stream (the tap still sees everything); returns the bytes discarded. */
  async drain(): Promise<number> {
    let n = 0;
    for (;;) {
      const piece = await this.take(1 << 20);
      if (piece.length === 0) return n;
      n += piece.length;
    }
  }
}

/** The size a StreamDevice reports: the stream's length is unknown until its end. */
export const UNKNOWN_STREAM_SIZE = Number.MAX_SAFE_INTEGER;

/**
 * A read-only BlockDevice over a SequentialInput. Reads at or past the stream's position advance it
 * (skipping what lies between); what was read is kept while `retain` is set, so reading it again
 * costs nothing; reading bytes the stream skipped throws a FormatError saying the stream is out of
 * order. size() is unknown (huge), so drivers must not look at the end of the file.
 */
export class StreamDevice implements BlockDevice {
  readonly writable = false;
  /** Keep what is read (metadata); cleared with release(). */
  retain = true;
  private kept: { start: number; bytes: Uint8Array }[] = [];

  constructor(
    private readonly input: SequentialInput,
    readonly path: string,
    private readonly format: string,
  ) {}

  async size(): Promise<number> {
    return UNKNOWN_STREAM_SIZE;
  }

  async allocated(): Promise<number> {
    return 0;
  }

  /** Forgets the kept bytes (the metadata has been decoded). */
  release(): void {
    this.kept = [];
    this.retain = false;
  }

  private keptAt(offset: number): { start: number; bytes: Uint8Array } | undefined {
    for (let i = this.kept.length - 1; i >= 0; i--) {
      const k = this.kept[i]!;
      if (offset >= k.start && offset < k.start + k.bytes.length) return k;
    }
    return undefined;
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      const at = offset + done;
      const k = this.keptAt(at);
      if (k) {
        const from = at - k.start;
        const n = Math.min(buf.length - done, k.bytes.length - from);
        buf.set(k.bytes.subarray(from, from + n), done);
        done += n;
        continue;
      }
      const pos = this.input.position;
      if (at < pos) {
        throw new FormatError(
          this.format,
          'stream order',
          at,
          `the image needs the bytes at ${at} after the stream has passed them (it is at ${pos}): it is not written in stream order (all metadata before the data it maps)`,
        );
      }
      if (at > pos) await this.input.skip(at - pos, `bytes up to offset ${at}`);
      // Up to the next kept range (nothing kept lies past the position, so none) or the end of buf.
      const bytes = await this.input.readUpTo(buf.length - done);
      if (bytes.length === 0) return done;
      buf.set(bytes, done);
      if (this.retain) this.kept.push({ start: at, bytes });
      done += bytes.length;
    }
    return done;
  }

  async write(): Promise<void> {
    throw new Error(`${this.path}: a stream is read-only`);
  }
  async flush(): Promise<void> {}
  async truncate(): Promise<void> {
    throw new Error(`${this.path}: a stream is read-only`);
  }
  async punchHole(): Promise<void> {
    throw new Error(`${this.path}: a stream is read-only`);
  }
  async nextData(offset: number): Promise<number | null> {
    return offset;
  }
  async nextHole(): Promise<number> {
    return UNKNOWN_STREAM_SIZE;
  }
  async close(): Promise<void> {}
}

export { isAllZero } from '../blockdev/sparse.js';
