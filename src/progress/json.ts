/**
 * `--progress json` for one conversion: one JSON object per line (README, "Progress output", is the
 * schema; json-lines.ts writes the fields every event carries).
 */
import type { ConversionReport, Phase, ProgressEvent } from '../engine/convert.js';
import { ImgconvError } from '../errors.js';
import { shellQuote } from './format.js';
import type { ProgressReporter } from './reporter.js';
import { errorMessage, imageStateOf } from './state.js';
import { JsonLines } from './json-lines.js';
import { ProgressTracker } from './tracker.js';

export type JsonEventName = 'phase' | 'progress' | 'stopping' | 'done' | 'error';

export class JsonReporter implements ProgressReporter {
  readonly showsErrors = true;
  readonly showsReport = false;
  private readonly lines: JsonLines<Phase>;
  private image = '';

  constructor(writeLine: (line: string) => void, now?: () => number) {
    this.lines = new JsonLines(new ProgressTracker(now), writeLine);
  }

  private emit(event: JsonEventName, extra: Record<string, unknown> = {}): void {
    this.lines.emit(event, extra);
  }

  async begin(image: string): Promise<void> {
    this.image = image;
  }

  progress(e: ProgressEvent): void {
    this.lines.progress(e);
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
