/**
 * Turns the engine's progress events ({phase, bytesDone, bytesTotal}) into what every output shows:
 * which phase, how far, how fast and how long to go. Time comes from an injectable clock so tests
 * can replay a conversion exactly.
 */
import { PHASES, type Phase, type ProgressEvent } from '../engine/convert.js';

/**
 * Phases whose counts are bytes. The others count one step (bytesTotal 1, bytesDone 0 → 1), so they
 * have no rate.
 */
export const BYTE_PHASES: ReadonlySet<Phase> = new Set<Phase>(['move', 'write']);

/** Below this much time in a phase a rate is noise (the first chunk lands in the page cache). */
const MIN_RATE_MS = 100;

export interface Snapshot {
  phase: Phase;
  /** 1-based position in PHASES. */
  phaseIndex: number;
  bytesDone: number;
  bytesTotal: number;
  /** Bytes per second since the phase began; 0 while unknown or for step phases. */
  rate: number;
  /** Seconds left in this phase at that rate; null while unknown. */
  etaSeconds: number | null;
  /** Milliseconds since the tracker was made (the conversion began). */
  elapsedMs: number;
  /** Milliseconds since this phase began. */
  phaseElapsedMs: number;
}

export class ProgressTracker {
  private current: { phase: Phase; startedAt: number; bytesDone: number; bytesTotal: number } | undefined;
  readonly startedAt: number;

  constructor(private readonly now: () => number = () => performance.now()) {
    this.startedAt = now();
  }

  /** Records an event; true when it begins a new phase. */
  update(e: ProgressEvent): boolean {
    const begins = this.current?.phase !== e.phase;
    if (begins) this.current = { phase: e.phase, startedAt: this.now(), bytesDone: e.bytesDone, bytesTotal: e.bytesTotal };
    else {
      this.current!.bytesDone = e.bytesDone;
      this.current!.bytesTotal = e.bytesTotal;
    }
    return begins;
  }

  get phase(): Phase | undefined {
    return this.current?.phase;
  }

  elapsedMs(): number {
    return this.now() - this.startedAt;
  }

  /** The current state; undefined before the first event. */
  snapshot(): Snapshot | undefined {
    const c = this.current;
    if (!c) return undefined;
    const now = this.now();
    const inPhase = now - c.startedAt;
    const rate = BYTE_PHASES.has(c.phase) && inPhase >= MIN_RATE_MS && c.bytesDone > 0 ? Math.round((c.bytesDone * 1000) / inPhase) : 0;
    return {
      phase: c.phase,
      phaseIndex: PHASES.indexOf(c.phase) + 1,
      bytesDone: c.bytesDone,
      bytesTotal: c.bytesTotal,
      rate,
      etaSeconds: rate > 0 ? Math.max(0, c.bytesTotal - c.bytesDone) / rate : null,
      elapsedMs: Math.round(now - this.startedAt),
      phaseElapsedMs: Math.round(inPhase),
    };
  }
}

/** Whole percent of a phase (100 for an empty phase). */
export function percent(s: { bytesDone: number; bytesTotal: number }): number {
  return s.bytesTotal > 0 ? Math.floor((Math.min(s.bytesDone, s.bytesTotal) * 100) / s.bytesTotal) : 100;
}
