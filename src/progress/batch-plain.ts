/**
 * A batch as plain lines (pipes, logs, CI): every line of one image's progress is the line a single
 * conversion prints, tagged with the image's name; a line when each image ends, with a count of the
 * batch so far; never an escape sequence. With progress off (--quiet, --progress none) only the
 * images that need action are reported.
 */
import type { BatchEvent } from '../batch/run.js';
import { OUTCOME_WORD, imageLabel, summaryLine } from './batch-table.js';
import { BatchTracker, limitsText } from './batch-state.js';
import type { BatchProgressReporter } from './batch-reporter.js';
import { bytes, duration } from './format.js';
import { PlainReporter } from './plain.js';

export class BatchPlainReporter implements BatchProgressReporter {
  readonly showsReport = false;
  private readonly tracker: BatchTracker;
  private readonly perImage = new Map<number, PlainReporter>();

  constructor(
    private readonly write: (text: string) => void,
    private readonly opts: { progress: boolean },
    private readonly now?: () => number,
  ) {
    this.tracker = new BatchTracker(now);
  }

  private line(text: string): void {
    if (this.opts.progress) this.write(`imgconv: ${text}\n`);
  }

  event(e: BatchEvent): void {
    this.tracker.update(e);
    switch (e.type) {
      case 'start':
        this.line(`${e.images.length} image${e.images.length === 1 ? '' : 's'} → ${e.to}, ${limitsText(e.limits, e.filesystems)}${e.manifest !== undefined ? `; manifest ${e.manifest}` : ''}`);
        break;
      case 'image-recover':
        this.line(`${e.image.name}: recovering an interrupted conversion first`);
        break;
      case 'image-recovered':
        this.line(`${e.image.name}: recovered: ${e.report.detail}`);
        break;
      case 'image-convert': {
        this.line(`${e.image.name}: converting ${e.from} → ${this.tracker.snapshot().to}`);
        // The single conversion's lines, each tagged with the image.
        const tag = `imgconv: ${e.image.name}: `;
        this.perImage.set(e.image.index, new PlainReporter((text) => this.write(text.replace(/^imgconv: /gm, tag)), this.opts, this.now));
        break;
      }
      case 'image-progress':
        this.perImage.get(e.image.index)?.progress(e.event);
        break;
      case 'image-end': {
        this.perImage.delete(e.image.index);
        const r = e.result;
        const name = imageLabel(r);
        let text: string;
        if (r.outcome === 'converted') {
          const w = r.report?.written;
          text = `${name}: converted ${r.from ?? '?'} → ${r.to} in ${duration(r.elapsedMs)}${w ? ` (metadata ${bytes(w.metadataBytes)}, data moved ${bytes(w.dataBytes + w.compactionBytes)})` : ''}${r.note ? `; ${r.note}` : ''}`;
        } else if (r.outcome === 'skipped') {
          text = `${name}: skipped: ${r.note ?? `already ${r.to}`}`;
        } else if (r.outcome === 'needs-recover') {
          text = `${name}: needs recover: ${r.reason}; run: ${r.recoverCommand}`;
        } else {
          text = `${name}: ${OUTCOME_WORD[r.outcome]}: ${r.reason}${r.imageState && r.imageState !== 'untouched' ? ` (image ${r.imageState})` : ''}`;
        }
        const s = this.tracker.snapshot();
        const count = `[${s.imagesDone}/${s.imagesTotal} images, ${bytes(s.bytesDone)} of ${bytes(s.bytesTotal)}]`;
        // Images that need action are reported even without progress output: they are the errors.
        if (this.opts.progress) this.write(`imgconv: ${count} ${text}\n`);
        else if (r.outcome !== 'converted' && r.outcome !== 'skipped') this.write(`imgconv: ${text}\n`);
        break;
      }
      case 'end':
        this.line(summaryLine(e.report));
        break;
    }
  }

  stopping(): void {
    this.line('stopping safely: no new image starts; conversions under way stop at their next safe point (or finish, past their commit point)...');
  }

  async close(): Promise<void> {}
}
