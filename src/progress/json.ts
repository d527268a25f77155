/**
 * `--progress json`: one JSON object per line (README, "Progress output", is the schema). Every
 * event carries event, phase, bytesDone, bytesTotal, rate, etaSeconds and elapsedMs; fields are only
 * ever added, never renamed or removed.
 */
import type { ConversionReport, ProgressEvent } from '../engine/convert.js';
import { ImgconvError } from '../errors.js';
import { shellQuote } from './format.js';
import type { ProgressReporter } from './reporter.js';
import { errorMessage, imageStateOf } from './state.js';
import { ProgressTracker, percent, type Snapshot } from './tracker.js';

export type JsonEventName = 'phase' | 'progress' | 'stopping' | 'done' | 'error';

/** A progress event at most this often within a phase, even when the percent has not moved. */
const HEARTBEAT_MS = 1000;

export class JsonReporter implements ProgressReporter {
  readonly showsErrors = true;
  readonly showsReport = false;
  private readonly tracker: ProgressTracker;
  private lastPercent = 0;
  private lastEmitMs = 0;
  private image = '';

  constructor(
    private readonly writeLine: (line: string) => void,
    now?: () => number,
  ) {
    this.tracker = new ProgressTracker(now);
  }

  private emit(event: JsonEventName, extra: Record<string, unknown> = {}): void {
    const s: Snapshot | undefined = this.tracker.snapshot();
    const common = {
      event,
      phase: s?.phase ?? null,
      bytesDone: s?.bytesDone ?? 0,
      bytesTotal: s?.bytesTotal ?? 0,
      rate: s?.rate ?? 0,
      etaSeconds: s?.etaSeconds === null || s === undefined ? null : Math.round(s.etaSeconds * 10) / 10,
      elapsedMs: s?.elapsedMs ?? Math.round(this.tracker.elapsedMs()),
    };
    this.lastEmitMs = common.elapsedMs;
    this.writeLine(JSON.stringify({ ...common, ...extra }) + '\n');
  }

  async begin(image: string): Promise<void> {
    this.image = image;
  }

  progress(e: ProgressEvent): void {
    if (this.tracker.update(e)) {
      this.lastPercent = percent(e);
      this.emit('phase');
      return;
    }
    const p = percent(e);
    if (p > this.lastPercent || this.tracker.elapsedMs() - this.lastEmitMs >= HEARTBEAT_MS) {
      this.lastPercent = p;
      this.emit('progress');
    }
  }

  stopping(): void {
    this.emit('stopping');
  }

  async done(r: ConversionReport): Promise<void> {
    this.emit('done', {
      image: r.image,
      source: r.source.format,
      target: r.target.format,
      parameters: r.target.parameters,
      metadataBytes: r.written.metadataBytes,
      dataBytes: r.written.dataBytes,
      compactionBytes: r.written.compactionBytes,
      reclaimedBytes: r.reclaimedBytes,
      fileLength: r.source.fileLength,
      finalLength: r.finalLength,
      verified: r.verified,
      dropped: r.dropped,
    });
  }

  fail(error: unknown): void {
    const state = imageStateOf(error);
    this.emit('error', {
      message: error instanceof ImgconvError ? error.message : `internal error: ${errorMessage(error)}`,
      imageState: state ?? null,
      recover: state === 'needs-recover' ? `imgconv recover ${shellQuote(this.image)}` : null,
    });
  }

  async close(): Promise<void> {}
}
