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

export class FreeSpaceCopier {
  private readonly buffers: [Uint8Array, Uint8Array];

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
   * Copies every run. The caller guarantees that no run's destination overlaps any run's source, and
   * that the destinations are free (nothing reads them until the caller has flushed and repointed).
   * `onRun(length)` after each run is written. When a run fails, the read in flight is waited for
   * before the error is thrown, so nothing touches the device once this has returned.
   */
  async copy(runs: readonly CopyRun[], onRun: (length: number) => void, signal?: AbortSignal): Promise<void> {
    for (const r of runs) if (r.length > this.runBytes) throw new Error(`copy run of ${r.length} bytes exceeds the ${this.runBytes}-byte buffer`);
    signal?.throwIfAborted();
    let next: Promise<Uint8Array> | undefined = runs.length > 0 ? this.read(runs[0]!, this.buffers[0]) : undefined;
    try {
      for (let k = 0; k < runs.length; k++) {
        const bytes = await next!;
        next = undefined;
        signal?.throwIfAborted();
        // The other buffer's write (run k − 1) has finished: read run k + 1 into it while run k is written.
        if (k + 1 < runs.length) next = this.read(runs[k + 1]!, this.buffers[(k + 1) % 2]!);
        await this.writeIntoFree(runs[k]!.to, bytes);
        onRun(runs[k]!.length);
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

  private async read(run: CopyRun, buffer: Uint8Array): Promise<Uint8Array> {
    const buf = buffer.subarray(0, run.length);
    let got = 0;
    while (got < run.length) {
      const n = await this.dev.read(buf.subarray(got), run.from + got);
      if (n === 0) break;
      got += n;
    }
    // Past the end of the file the source reads zeros; the buffer still holds an earlier run's bytes.
    if (got < run.length) buf.fill(0, got);
    return buf;
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
