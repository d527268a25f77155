/**
 * Pieces the format writers share: copying guest ranges into a sink in large reads, and refusing
 * -o options a stream target does not know.
 */
import type { TargetOptions } from '../driver.js';
import { UsageError } from '../errors.js';
import type { GuestSource, StreamSink } from './types.js';

/** Guest bytes per read: large enough that per-call costs vanish next to the copy. */
export const COPY_CHUNK = 4 << 20;

/** Copies guest [start, end) into the sink (bytes past the virtual size read as zeros). */
export async function copyGuest(source: GuestSource, sink: StreamSink, start: number, end: number, chunk = COPY_CHUNK): Promise<void> {
  for (let at = start; at < end; ) {
    const n = Math.min(chunk, end - at);
    await sink.write(await source.read(at, n));
    at += n;
  }
}

/** Refuses options outside `known`, naming them (a stream target never ignores an option). */
export function checkStreamOptions(format: string, options: TargetOptions, known: readonly string[]): void {
  for (const k of Object.keys(options)) {
    if (!known.includes(k)) {
      throw new UsageError(`${format} stream has no option "${k}"${known.length ? ` (known: ${known.join(', ')})` : ' (it takes none)'}`);
    }
  }
}
