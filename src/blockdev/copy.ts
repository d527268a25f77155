/**
 * Copies inside one device from live places into free space, as the engine's relocation rounds make
 * them (src/engine/relocate.ts). What makes it fast, measured on a 1 GiB QED → raw (2 GiB copied):
 * - Two buffers, reused: reading into a fresh 8 MiB buffer costs the kernel a page fault per 4 KiB
 *   (1.4–2 s per GiB here, against 0.09 s into a buffer already mapped), and the garbage collector
 *   the rest.
 * - The next run is read while the current one is written: both go to libuv's thread pool, and the
 *   zero scan runs on the main thread meanwhile. Sources are live and destinations free, so within one
 *   call they never overlap and the order of a read and a write between them does not matter.
 * - The file's length is tracked here, not asked with fstat twice per run, and the destination is not
 *   punched before it is written: non-zero blocks overwrite whatever stale bytes free space holds, and
 *   only all-zero blocks inside the file are punched (past its end they read as zeros already).
 * The result is what a punch of the whole destination followed by writing its non-zero blocks gives:
 * the destination reads the source's bytes and is as sparse as they are.
 */
import { HOLE_BLOCK, isZeroRange } from './sparse.js';
import type { BlockDevice } from './types.js';

export interface CopyRun {
  from: number;
  to: number;
  length: number;
}

/**
 * One destination range [to, to+length) filled from several source pieces laid one after another (the
 * pieces' lengths add up to `length`). A qcow2 with 512-byte clusters keeps its data in 32 KiB pieces
 * between its 512-byte tables; moved into one contiguous place, they are one write, not one per piece.
 */
export interface GatherRun {
  to: number;
  length: number;
  pieces: readonly { from: number; length: number }[];
}

/** Source reads of one gathered run in flight at once (libuv's pool has four threads by default). */
const READS_IN_FLIGHT = 8;
/** Pieces whose sources lie at most this far apart are read as one span (the gap's bytes read and dropped)… */
const SPAN_GAP = 4096;
/** …of at most this many bytes (each of the READS_IN_FLIGHT readers has a scratch buffer of it). */
const SPAN_BYTES = 1 << 20;

/**
 * Copy runs as gathered runs of at most `maxBytes`: runs whose destinations continue each other (in
 * destination order) share one buffer and one write, and pieces whose sources continue too are one
 * read. A run longer than `maxBytes` stays a run of its own (the copier refuses it, as before).
 */
export function gatherRuns(runs: readonly CopyRun[], maxBytes: number): GatherRun[] {
  const sorted = runs.filter((r) => r.length > 0).sort((a, b) => a.to - b.to);
  const out: { to: number; length: number; pieces: { from: number; length: number }[] }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && last.to + last.length === r.to && last.length + r.length <= maxBytes) {
      const p = last.pieces[last.pieces.length - 1]!;
      if (p.from + p.length === r.from) p.length += r.length;
      else last.pieces.push({ from: r.from, length: r.length });
      last.length += r.length;
    } else out.push({ to: r.to, length: r.length, pieces: [{ from: r.from, length: r.length }] });
  }
  return out;
}

const asGather = (r: CopyRun | GatherRun): GatherRun => ('pieces' in r ? r : { to: r.to, length: r.length, pieces: [{ from: r.from, length: r.length }] });

export class FreeSpaceCopier {
  private readonly buffers: [Uint8Array, Uint8Array];
  /** Per reader of a run, the buffer a span of pieces is read into (made when first needed). */
  private readonly scratch: Uint8Array[] = [];

  /**
   * `fileSize` must be the device's length now (or more); this copier must be the only writer of the
   * device while it is used, or be told of other writes (`wrote`). `runBytes`: the longest run.
   */
  constructor(
    private readonly dev: BlockDevice,
    private fileSize: number,
    readonly runBytes: number,
  ) {
    this.buffers = [new Uint8Array(runBytes), new Uint8Array(runBytes)];
  }

  static async open(dev: BlockDevice, runBytes: number): Promise<FreeSpaceCopier> {
    return new FreeSpaceCopier(dev, await dev.size(), runBytes);
  }

  /** The device's length as far as this copier knows (never less than the real one). */
  get size(): number {
    return this.fileSize;
  }

  /** Someone else wrote [offset, offset+length) of the device. */
  wrote(offset: number, length: number): void {
    this.fileSize = Math.max(this.fileSize, offset + length);
  }

  /**
   * Copies every run (a gathered run: its pieces, read in parallel, into one buffer written once). The
   * caller guarantees that no run's destination overlaps any run's source, and that the destinations
   * are free (nothing reads them until the caller has flushed and repointed). `onRun(length)` after
   * each run is written. When a run fails, every read in flight is waited for before the error is
   * thrown, so nothing touches the device once this has returned.
   */
  async copy(runs: readonly (CopyRun | GatherRun)[], onRun: (length: number) => void, signal?: AbortSignal): Promise<void> {
    for (const r of runs) if (r.length > this.runBytes) throw new Error(`copy run of ${r.length} bytes exceeds the ${this.runBytes}-byte buffer`);
    signal?.throwIfAborted();
    const gathered = runs.map(asGather);
    let next: Promise<Uint8Array> | undefined = gathered.length > 0 ? this.read(gathered[0]!, this.buffers[0]) : undefined;
    try {
      for (let k = 0; k < gathered.length; k++) {
        const bytes = await next!;
        next = undefined;
        signal?.throwIfAborted();
        // The other buffer's write (run k − 1) has finished: read run k + 1 into it while run k is written.
        if (k + 1 < gathered.length) next = this.read(gathered[k + 1]!, this.buffers[(k + 1) % 2]!);
        await this.writeIntoFree(gathered[k]!.to, bytes);
        onRun(gathered[k]!.length);
      }
    } finally {
      if (next) await next.catch(() => undefined);
    }
  }

  /** Punches [offset, offset+length) where it lies inside the file (past the end it reads zeros). */
  async punch(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.fileSize);
    if (end > offset) await this.dev.punchHole(offset, end - offset);
  }

  /**
   * Reads a run's pieces into `buffer`, up to READS_IN_FLIGHT reads at once. Pieces whose sources follow
   * each other with small gaps (a 512-byte-cluster qcow2: 32 KiB of data, a 512-byte table, 32 KiB of
   * data) are one read of the span into a scratch buffer, the pieces copied out of it: a read costs far
   * more than the few gap bytes (nothing is written to a source during the call, and the gap bytes are
   * thrown away, so what they hold does not matter). When a read fails no further one is started, and
   * the error is thrown once every read in flight has ended. One read of runs at a time (copy's loop).
   */
  private async read(run: GatherRun, buffer: Uint8Array): Promise<Uint8Array> {
    const buf = buffer.subarray(0, run.length);
    // Spans: consecutive pieces [first, end) with increasing sources, gaps ≤ SPAN_GAP, ≤ SPAN_BYTES long.
    const spans: { first: number; end: number; at: number }[] = [];
    let sum = 0;
    for (let k = 0; k < run.pieces.length; k++) {
      const p = run.pieces[k]!;
      const span = spans[spans.length - 1];
      const prev = run.pieces[k - 1];
      if (span && prev) {
        const gap = p.from - (prev.from + prev.length);
        if (gap >= 0 && gap <= SPAN_GAP && p.from + p.length - run.pieces[span.first]!.from <= SPAN_BYTES) {
          span.end = k + 1;
          sum += p.length;
          continue;
        }
      }
      spans.push({ first: k, end: k + 1, at: sum });
      sum += p.length;
    }
    if (sum !== run.length) throw new Error(`gathered run at ${run.to}: pieces of ${sum} bytes for a run of ${run.length}`);
    let taken = 0;
    let failed = false;
    const worker = async (w: number) => {
      while (!failed && taken < spans.length) {
        const s = spans[taken++]!;
        try {
          const first = run.pieces[s.first]!;
          if (s.end === s.first + 1) {
            await this.readPiece(first.from, buf.subarray(s.at, s.at + first.length));
            continue;
          }
          const last = run.pieces[s.end - 1]!;
          const scratch = (this.scratch[w] ??= new Uint8Array(SPAN_BYTES)).subarray(0, last.from + last.length - first.from);
          await this.readPiece(first.from, scratch);
          let at = s.at;
          for (let k = s.first; k < s.end; k++) {
            const p = run.pieces[k]!;
            buf.set(scratch.subarray(p.from - first.from, p.from - first.from + p.length), at);
            at += p.length;
          }
        } catch (e) {
          failed = true;
          throw e;
        }
      }
    };
    const results = await Promise.allSettled(Array.from({ length: Math.min(READS_IN_FLIGHT, spans.length) }, (_, w) => worker(w)));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
    return buf;
  }

  private async readPiece(from: number, buf: Uint8Array): Promise<void> {
    let got = 0;
    while (got < buf.length) {
      const n = await this.dev.read(buf.subarray(got), from + got);
      if (n === 0) break;
      got += n;
    }
    // Past the end of the file the source reads zeros; the buffer still holds an earlier run's bytes.
    if (got < buf.length) buf.fill(0, got);
  }

  /**
   * Writes `bytes` at `offset`, into space that may hold stale bytes: runs of non-zero blocks are
   * written, runs of all-zero blocks punched where they lie inside the file (blocks follow the
   * destination's alignment, so a hole is a whole file system block), and the file is extended to the
   * copy's end if it ended before: a format may require the whole of a structure inside the file (QED:
   * a cluster past the end is an error).
   */
  private async writeIntoFree(offset: number, bytes: Uint8Array): Promise<void> {
    const blockEnd = (at: number) => Math.min(bytes.length, at + HOLE_BLOCK - ((offset + at) % HOLE_BLOCK));
    let at = 0;
    while (at < bytes.length) {
      let end = blockEnd(at);
      const zero = isZeroRange(bytes, at, end);
      while (end < bytes.length) {
        const e = blockEnd(end);
        if (isZeroRange(bytes, end, e) !== zero) break;
        end = e;
      }
      if (!zero) {
        await this.dev.write(bytes.subarray(at, end), offset + at);
        this.wrote(offset + at, end - at);
        // The disk can write this run while the next ones are copied, not all of them at the flush.
        this.dev.startWriteback?.(offset + at, end - at);
      } else await this.punch(offset + at, end - at);
      at = end;
    }
    if (this.fileSize < offset + bytes.length) {
      await this.dev.truncate(offset + bytes.length);
      this.fileSize = offset + bytes.length;
    }
  }
}
