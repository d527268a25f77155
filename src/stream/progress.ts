/**
 * Progress of `stream` and `unstream` on stderr, with the event shape of `inplace --progress json`
 * (README, "Progress output"): every event has event, phase, bytesDone, bytesTotal, rate, etaSeconds
 * and elapsedMs. Streaming has its own phases:
 *   stream:   map (read the chain's mappings and lay the image out), measure (only when the size
 *             depends on the data and must be known first: compressed VMDK in a tar), write
 *   unstream: head (read and check the metadata), write, and convert (only when the destination is
 *             made from the raw disk in place)
 * `map`, `head` and `convert` count one step (0 → 1 of 1); `measure` and `write` count bytes.
 */
import { ImgconvError } from '../errors.js';
import { bytes, duration, speedAndEta } from '../progress/format.js';
import { JsonLines } from '../progress/json-lines.js';
import { PhaseTracker, percent } from '../progress/tracker.js';

export type StreamPhase = 'map' | 'measure' | 'head' | 'write' | 'convert';
export const STREAM_PROGRESS_MODES = ['auto', 'plain', 'json', 'none'] as const;
export type StreamProgressMode = (typeof STREAM_PROGRESS_MODES)[number];

export interface StreamProgressEvent {
  phase: StreamPhase;
  bytesDone: number;
  bytesTotal: number;
}

export interface StreamReporter {
  progress(e: StreamProgressEvent): void;
  stopping(): void;
  /** The last event; `extra` is the command's report. */
  done(extra: Record<string, unknown>): void;
  fail(error: unknown, extra?: Record<string, unknown>): void;
  /** Whether fail() already told the user (the CLI then prints no second line). */
  readonly showsErrors: boolean;
}

const BYTE_PHASES = new Set<StreamPhase>(['measure', 'write']);
const PHASE_ORDER: readonly StreamPhase[] = ['map', 'measure', 'head', 'write', 'convert'];
const tracker = (now: () => number) => new PhaseTracker(PHASE_ORDER, BYTE_PHASES, now);

function messageOf(error: unknown): string {
  return error instanceof ImgconvError ? error.message : `internal error: ${error instanceof Error ? error.message : String(error)}`;
}

/** `--progress json`: one object per line. */
export class JsonStreamReporter implements StreamReporter {
  readonly showsErrors = true;
  private readonly lines: JsonLines<StreamPhase>;

  constructor(writeLine: (line: string) => void, now: () => number = () => performance.now()) {
    this.lines = new JsonLines(tracker(now), writeLine);
  }

  private emit(event: string, extra: Record<string, unknown> = {}): void {
    this.lines.emit(event, extra);
  }

  progress(e: StreamProgressEvent): void {
    this.lines.progress(e);
  }

  stopping(): void {
    this.emit('stopping');
  }

  done(extra: Record<string, unknown>): void {
    this.emit('done', extra);
  }

  fail(error: unknown, extra: Record<string, unknown> = {}): void {
    this.emit('error', { message: messageOf(error), imageState: null, recover: null, ...extra });
  }
}

/** Plain lines: one per phase and per 10% of a byte phase; with `progress: false`, nothing. */
export class PlainStreamReporter implements StreamReporter {
  readonly showsErrors = false;
  private readonly tracker: PhaseTracker<StreamPhase>;
  private tenths = 0;

  constructor(
    private readonly write: (text: string) => void,
    private readonly opts: { progress: boolean; phases: readonly StreamPhase[] },
    now: () => number = () => performance.now(),
  ) {
    this.tracker = tracker(now);
  }

  progress(e: StreamProgressEvent): void {
    if (!this.opts.progress) return;
    const counted = BYTE_PHASES.has(e.phase);
    if (this.tracker.update(e)) {
      this.tenths = 0;
      const i = this.opts.phases.indexOf(e.phase) + 1;
      this.write(`imgconv: [${i}/${this.opts.phases.length}] ${e.phase}${counted ? ` (${bytes(e.bytesTotal)})` : ''}\n`);
    }
    if (!counted || e.bytesTotal === 0) return;
    const tenths = Math.floor(percent(e) / 10);
    if (tenths <= this.tenths) return;
    this.tenths = tenths;
    const s = this.tracker.snapshot()!;
    this.write(`imgconv: ${e.phase} ${tenths * 10}% (${[`${bytes(s.bytesDone)} of ${bytes(s.bytesTotal)}`, ...speedAndEta(s)].join(', ')})\n`);
  }

  stopping(): void {
    if (this.opts.progress) this.write('imgconv: stopping...\n');
  }

  done(extra: Record<string, unknown>): void {
    if (!this.opts.progress) return;
    const n = typeof extra.bytes === 'number' ? `, ${extra.bytes} bytes` : '';
    this.write(`imgconv: done in ${duration(this.tracker.elapsedMs())}${n}\n`);
  }

  fail(): void {
    // The CLI's main() prints the error, as for every command.
  }
}

export function createStreamReporter(
  mode: StreamProgressMode,
  stream: NodeJS.WritableStream,
  phases: readonly StreamPhase[],
): StreamReporter {
  if (mode === 'json') return new JsonStreamReporter((line) => stream.write(line));
  // auto: plain lines (a live view would share the terminal with nothing but itself; lines suffice).
  return new PlainStreamReporter((text) => stream.write(text), { progress: mode !== 'none', phases });
}
