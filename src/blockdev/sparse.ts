/**
 * Keeping copies sparse: data copied into space that reads zeros needs only its non-zero blocks
 * written, so a copy allocates no more than its source did (a raw disk's holes, zero-filled parts of
 * clusters). Used by unstream's destination and by every copy the conversion engine makes.
 */
import type { BlockDevice } from './types.js';

/** Granularity of holes: the usual file system block. */
export const HOLE_BLOCK = 4096;

const ZEROS = Buffer.alloc(1 << 20);

/** Whether every byte is zero. */
export function isAllZero(bytes: Uint8Array): boolean {
  return isZeroRange(bytes, 0, bytes.length);
}

/** Whether bytes[start, end) are all zero, without a view per call (writes scan 4 KiB blocks). */
export function isZeroRange(bytes: Uint8Array, start: number, end: number): boolean {
  if (end <= start) return true;
  // Data blocks rarely begin and end with zeros: most answers come without a call into native code.
  if (bytes[start] !== 0 || bytes[end - 1] !== 0) return false;
  const whole = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  for (let at = start; at < end; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, end - at);
    // memcmp against zeros: far faster than a byte loop.
    if (whole.compare(ZEROS, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

/**
 * Writes `bytes` at `offset`, leaving out every aligned all-zero block; neighbouring blocks with data
 * go out as one write. The destination must already read zeros (past the end of the file, or punched).
 */
export async function writeSparse(dev: BlockDevice, offset: number, bytes: Uint8Array): Promise<void> {
  let runStart = -1;
  let at = 0;
  while (at < bytes.length) {
    // Blocks follow the destination's alignment, so a hole is a whole file system block.
    const end = Math.min(bytes.length, at + HOLE_BLOCK - ((offset + at) % HOLE_BLOCK));
    const zero = isZeroRange(bytes, at, end);
    if (!zero && runStart < 0) runStart = at;
    if (zero && runStart >= 0) {
      await dev.write(bytes.subarray(runStart, at), offset + runStart);
      runStart = -1;
    }
    at = end;
  }
  if (runStart >= 0) await dev.write(bytes.subarray(runStart), offset + runStart);
}

/**
 * Copies `bytes` into free space that may hold stale bytes: the part inside the file is punched first
 * (reads zeros; without hole punching, zeros are written — correct, only less sparse), then only the
 * non-zero blocks are written, and the file is extended to the copy's end if it ended before: a format
 * may require the whole of a structure inside the file (QED: a cluster past the end is an error), and a
 * copy whose last blocks are zeros would otherwise leave the file short.
 */
export async function writeIntoFree(dev: BlockDevice, offset: number, bytes: Uint8Array): Promise<void> {
  const size = await dev.size();
  const insideEnd = Math.min(offset + bytes.length, size);
  if (insideEnd > offset) await dev.punchHole(offset, insideEnd - offset);
  await writeSparse(dev, offset, bytes);
  const end = offset + bytes.length;
  if ((await dev.size()) < end) await dev.truncate(end);
}
