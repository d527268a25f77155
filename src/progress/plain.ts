/**
 * Line-oriented progress for pipes, logs and CI: a line when a phase begins and one per 10% of a
 * phase's bytes, never an escape sequence. With progress off (--quiet, --progress none) only errors.
 */
import type { ConversionReport, ProgressEvent } from '../engine/convert.js';
import { ConversionFailedError, PHASES } from '../engine/convert.js';
import { bytes, duration, speedAndEta } from './format.js';
import type { ProgressReporter } from './reporter.js';
import { BYTE_PHASES, ProgressTracker, percent } from './tracker.js';

/** The CLI's words for each state (unchanged from before progress output existed). */
export function plainImageState(e: ConversionFailedError, image: string): string {
  return {
    untouched: 'the image was left untouched',
    'rolled-back': 'the image was restored to its original format',
    converted: 'the image is already converted',
    'needs-recover': `the image needs: imgconv recover ${image}`,
    intermediate: 'the image is valid in the intermediate format of a two-step conversion; run the conversion again to finish it',
  }[e.imageState];
}

export class PlainReporter implements ProgressReporter {
  readonly showsErrors = false;
  readonly showsReport = false;
  private readonly tracker: ProgressTracker;
  private tenths = 0;
  private image = '';

  constructor(
    private readonly write: (text: string) => void,
    private readonly opts: { progress: boolean },
    now?: () => number,
  ) {
    this.tracker = new ProgressTracker(now);
  }

  async begin(image: string): Promise<void> {
    this.image = image;
  }

  progress(e: ProgressEvent): void {
    if (!this.opts.progress) return;
    const counted = BYTE_PHASES.has(e.phase);
    if (this.tracker.update(e)) {
      this.tenths = 0;
      this.write(`imgconv: [${PHASES.indexOf(e.phase) + 1}/${PHASES.length}] ${e.phase}${counted ? ` (${bytes(e.bytesTotal)})` : ''}\n`);
    }
    if (!counted || e.bytesTotal === 0) return;
    const tenths = Math.floor(percent(e) / 10);
    if (tenths <= this.tenths) return;
    this.tenths = tenths;
    const s = this.tracker.snapshot()!;
    this.write(`imgconv: ${e.phase} ${tenths * 10}% (${[`${bytes(s.bytesDone)} of ${bytes(s.bytesTotal)}`, ...speedAndEta(s)].join(', ')})\n`);
  }

  stopping(): void {
    if (this.opts.progress) this.write('imgconv: stopping safely (finishing or rolling back to a consistent point)...\n');
  }

  async done(_report: ConversionReport): Promise<void> {
    if (this.opts.progress) this.write(`imgconv: done in ${duration(this.tracker.elapsedMs())}\n`);
  }

  fail(error: unknown): void {
    // Other errors are printed by the CLI's main(), as for every command.
    if (error instanceof ConversionFailedError) this.write(`imgconv: ${error.message}\nimgconv: ${plainImageState(error, this.image)}\n`);
  }

  async close(): Promise<void> {}
}
