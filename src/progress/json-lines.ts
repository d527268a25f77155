/**
 * The `--progress json` line writer shared by `inplace` (json.ts) and the stream commands
 * (src/stream/progress.ts): every line carries event, phase, bytesDone, bytesTotal, rate, etaSeconds
 * and elapsedMs (README, "Progress output"), then the event's own fields. Fields are only ever added.
 */
import { percent, type PhaseTracker } from './tracker.js';

/** A progress event at most this often within a phase, even when the percent has not moved. */
const HEARTBEAT_MS = 1000;

export class JsonLines<P extends string> {
  private lastPercent = 0;
  private lastEmitMs = 0;

  constructor(
    readonly tracker: PhaseTracker<P>,
    private readonly writeLine: (line: string) => void,
  ) {}

  emit(event: string, extra: Record<string, unknown> = {}): void {
    const s = this.tracker.snapshot();
    const common = {
      event,
      phase: s?.phase ?? null,
      bytesDone: s?.bytesDone ?? 0,
      bytesTotal: s?.bytesTotal ?? 0,
      rate: s?.rate ?? 0,
      etaSeconds: s === undefined || s.etaSeconds === null ? null : Math.round(s.etaSeconds * 10) / 10,
      elapsedMs: s?.elapsedMs ?? Math.round(this.tracker.elapsedMs()),
    };
    this.lastEmitMs = common.elapsedMs;
    this.writeLine(JSON.stringify({ ...common, ...extra }) + '\n');
  }

  /** A `phase` line when the event begins a phase; else a `progress` line per whole percent, or a heartbeat. */
  progress(e: { phase: P; bytesDone: number; bytesTotal: number }): void {
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
}
