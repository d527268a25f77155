/**
 * What every batch output shows, folded from the runner's events: how many images are finished,
 * how many bytes of image files that is, what the conversions have written so far, and which
 * images are active in which phase. Time comes from an injectable clock so tests replay exactly.
 */
import type { BatchEvent, BatchImage, BatchReport, ImageResult } from '../batch/run.js';
import type { ScheduleLimits } from '../batch/schedule.js';
import { ProgressTracker, type Snapshot } from './tracker.js';

export interface ActiveImage {
  image: BatchImage;
  from?: string;
  /** Recovering an interrupted conversion (before converting). */
  recovering: boolean;
  progress?: Snapshot;
}

export interface BatchSnapshot {
  to: string;
  imagesTotal: number;
  imagesDone: number;
  /** Lengths of every image file, and of those finished. */
  bytesTotal: number;
  bytesDone: number;
  /** Bytes written by this run's conversions so far: data moved (compaction included) and new metadata. */
  writtenBytes: number;
  active: ActiveImage[];
  /** Finished images, in the order they finished. */
  finished: ImageResult[];
  limits?: ScheduleLimits;
  filesystems: number;
  manifest?: string;
  elapsedMs: number;
  report?: BatchReport;
}

/** "one at a time per filesystem (2 filesystems)" or "3 at a time". */
export function limitsText(limits: ScheduleLimits | undefined, filesystems: number): string {
  if (!limits) return '';
  if (Number.isFinite(limits.total)) return `${limits.total} at a time`;
  return `one at a time per filesystem (${filesystems} filesystem${filesystems === 1 ? '' : 's'})`;
}

export class BatchTracker {
  private readonly started: number;
  private to = '';
  private images: BatchImage[] = [];
  private limits: ScheduleLimits | undefined;
  private filesystems = 0;
  private manifest: string | undefined;
  private readonly active = new Map<number, { image: BatchImage; from?: string; recovering: boolean; tracker?: ProgressTracker; written: Map<string, number> }>();
  private readonly finished: ImageResult[] = [];
  private written = 0;
  private report: BatchReport | undefined;

  constructor(private readonly now: () => number = () => performance.now()) {
    this.started = now();
  }

  update(e: BatchEvent): void {
    switch (e.type) {
      case 'start':
        this.to = e.to;
        this.images = e.images;
        this.limits = e.limits;
        this.filesystems = e.filesystems;
        this.manifest = e.manifest;
        break;
      case 'image-start':
        this.active.set(e.image.index, { image: e.image, recovering: false, written: new Map() });
        break;
      case 'image-recover': {
        const a = this.active.get(e.image.index);
        if (a) a.recovering = true;
        break;
      }
      case 'image-recovered': {
        const a = this.active.get(e.image.index);
        if (a) {
          a.recovering = false;
          a.tracker = undefined;
        }
        break;
      }
      case 'image-convert': {
        const a = this.active.get(e.image.index);
        if (a) {
          a.from = e.from;
          a.tracker = new ProgressTracker(this.now);
        }
        break;
      }
      case 'image-progress': {
        const a = this.active.get(e.image.index);
        if (!a) break;
        a.tracker ??= new ProgressTracker(this.now);
        a.tracker.update(e.event);
        // Bytes written: move and write count bytes, and so does reclaim while it compacts (otherwise it
        // counts one step, 0 → 1 of 1); the latest count of each phase is what it has written.
        const counted = e.event.phase === 'move' || e.event.phase === 'write' || (e.event.phase === 'reclaim' && e.event.bytesTotal > 1);
        if (!a.recovering && counted) {
          const before = a.written.get(e.event.phase) ?? 0;
          if (e.event.bytesDone > before) {
            this.written += e.event.bytesDone - before;
            a.written.set(e.event.phase, e.event.bytesDone);
          }
        }
        break;
      }
      case 'image-end':
        this.active.delete(e.image.index);
        this.finished.push(e.result);
        break;
      case 'end':
        this.report = e.report;
        break;
    }
  }

  elapsedMs(): number {
    return this.now() - this.started;
  }

  snapshot(): BatchSnapshot {
    const doneIdx = new Set(this.finished.map((r) => r.index));
    return {
      to: this.to,
      imagesTotal: this.images.length,
      imagesDone: this.finished.length,
      bytesTotal: this.images.reduce((s, i) => s + i.size, 0),
      bytesDone: this.images.filter((i) => doneIdx.has(i.index)).reduce((s, i) => s + i.size, 0),
      writtenBytes: this.written,
      active: [...this.active.values()]
        .sort((a, b) => a.image.index - b.image.index)
        .map((a) => ({ image: a.image, ...(a.from ? { from: a.from } : {}), recovering: a.recovering, ...(a.tracker?.snapshot() ? { progress: a.tracker.snapshot()! } : {}) })),
      finished: this.finished.slice(),
      ...(this.limits ? { limits: this.limits } : {}),
      filesystems: this.filesystems,
      ...(this.manifest !== undefined ? { manifest: this.manifest } : {}),
      elapsedMs: Math.round(this.elapsedMs()),
      ...(this.report ? { report: this.report } : {}),
    };
  }
}
