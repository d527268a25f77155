/**
 * A batch as JSON lines (README, "Many images", is the schema). Each image's events are exactly
 * those of a single conversion (`phase`, `progress`, then one `done` or `error`), with `image` (the
 * name given) and `path` (the real path) added; `recovering`/`recovered` when an interrupted
 * conversion is recovered first. Batch events (`batch-start`, `stopping`, `batch-end`) have
 * `image: null`. Every event carries the single conversion's common fields.
 */
import type { BatchEvent, BatchImage, ImageResult } from '../batch/run.js';
import { BatchTracker } from './batch-state.js';
import type { BatchProgressReporter } from './batch-reporter.js';
import { JsonReporter } from './json.js';
import { ProgressTracker } from './tracker.js';

interface PerImage {
  reporter: JsonReporter;
  tracker: ProgressTracker;
  /** Fields added to the next line the reporter writes (its final event). */
  extra: Record<string, unknown>;
}

export function resultFields(r: ImageResult): Record<string, unknown> {
  return {
    image: r.image,
    path: r.path,
    aliases: r.aliases,
    outcome: r.outcome,
    source: r.from ?? null,
    target: r.to,
    elapsedMs: Math.round(r.elapsedMs),
    metadataBytes: r.report?.written.metadataBytes ?? 0,
    dataBytes: r.report?.written.dataBytes ?? 0,
    compactionBytes: r.report?.written.compactionBytes ?? 0,
    reason: r.reason ?? null,
    note: r.note ?? null,
    imageState: r.imageState ?? null,
    recover: r.recoverCommand ?? null,
  };
}

export class BatchJsonReporter implements BatchProgressReporter {
  readonly showsReport = false;
  private readonly batch: BatchTracker;
  private readonly perImage = new Map<number, PerImage>();
  private readonly recovering = new Set<number>();

  constructor(
    private readonly writeLine: (line: string) => void,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.batch = new BatchTracker(now);
  }

  private batchEvent(event: string, extra: Record<string, unknown> = {}): void {
    const s = this.batch.snapshot();
    this.writeLine(
      JSON.stringify({ event, phase: null, bytesDone: s.bytesDone, bytesTotal: s.bytesTotal, rate: 0, etaSeconds: null, elapsedMs: s.elapsedMs, image: null, imagesDone: s.imagesDone, imagesTotal: s.imagesTotal, ...extra }) + '\n',
    );
  }

  /** An image's event not made by its JsonReporter, with the same common fields. */
  private imageEvent(image: BatchImage, p: PerImage | undefined, event: string, extra: Record<string, unknown>): void {
    const s = p?.tracker.snapshot();
    this.writeLine(
      JSON.stringify({
        event,
        phase: s?.phase ?? null,
        bytesDone: s?.bytesDone ?? 0,
        bytesTotal: s?.bytesTotal ?? 0,
        rate: s?.rate ?? 0,
        etaSeconds: s?.etaSeconds == null ? null : Math.round(s.etaSeconds * 10) / 10,
        elapsedMs: s?.elapsedMs ?? Math.round(p?.tracker.elapsedMs() ?? 0),
        image: image.name,
        path: image.path,
        ...extra,
      }) + '\n',
    );
  }

  event(e: BatchEvent): void {
    this.batch.update(e);
    switch (e.type) {
      case 'start':
        this.batchEvent('batch-start', {
          target: e.to,
          images: e.images.map((i) => ({ image: i.name, path: i.path, aliases: i.aliases, size: i.size })),
          jobs: Number.isFinite(e.limits.total) ? e.limits.total : null,
          filesystems: e.filesystems,
          manifest: e.manifest ?? null,
        });
        break;
      case 'image-start': {
        const p: PerImage = {
          tracker: new ProgressTracker(this.now),
          extra: {},
          reporter: undefined as unknown as JsonReporter,
        };
        p.reporter = new JsonReporter((line) => {
          const o = JSON.parse(line) as Record<string, unknown>;
          this.writeLine(JSON.stringify({ ...o, image: e.image.name, path: e.image.path, ...p.extra }) + '\n');
          p.extra = {};
        }, this.now);
        void p.reporter.begin(e.image.path);
        this.perImage.set(e.image.index, p);
        break;
      }
      case 'image-recover':
        this.recovering.add(e.image.index);
        this.imageEvent(e.image, this.perImage.get(e.image.index), 'recovering', {});
        break;
      case 'image-recovered':
        this.recovering.delete(e.image.index);
        this.imageEvent(e.image, this.perImage.get(e.image.index), 'recovered', { action: e.report.action, format: e.report.format, detail: e.report.detail });
        break;
      case 'image-convert':
        break;
      case 'image-progress': {
        const p = this.perImage.get(e.image.index);
        if (!p) break;
        // Recovery's own verify/reclaim steps are summed up by `recovered`; the phase stream is the conversion's.
        if (this.recovering.has(e.image.index)) break;
        p.tracker.update(e.event);
        p.reporter.progress(e.event);
        break;
      }
      case 'image-end': {
        const p = this.perImage.get(e.image.index);
        this.perImage.delete(e.image.index);
        this.recovering.delete(e.image.index);
        const r = e.result;
        const fields = resultFields(r);
        if (r.outcome === 'converted' && r.report && p) {
          p.extra = { outcome: r.outcome, note: fields.note };
          void p.reporter.done(r.report);
        } else if (r.outcome === 'converted' || r.outcome === 'skipped') {
          this.imageEvent(e.image, p, 'done', { source: fields.source, target: r.to, outcome: r.outcome, note: fields.note });
        } else {
          this.imageEvent(e.image, p, 'error', { message: r.reason ?? r.outcome, imageState: fields.imageState, recover: fields.recover, outcome: r.outcome });
        }
        break;
      }
      case 'end':
        this.batchEvent('batch-end', {
          target: e.report.to,
          ok: e.report.ok,
          interrupted: e.report.interrupted,
          counts: e.report.counts,
          results: e.report.results.map(resultFields),
          manifest: e.report.manifest ?? null,
        });
        break;
    }
  }

  stopping(): void {
    this.batchEvent('stopping');
  }

  async close(): Promise<void> {}
}
