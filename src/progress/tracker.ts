/**
 * Turns the engine's progress events ({phase, bytesDone, bytesTotal}) into what every output shows:
 * which phase, how far, how fast and how long to go. Time comes from an injectable clock so tests
 * can replay a conversion exactly.
 */
import { PHASES, type Phase } from '../engine/convert.js';

/**
 * Phases whose counts are bytes. The others count one step (bytesTotal 1, bytesDone 0 → 1), so they
 * have no rate.
 */
export const BYTE_PHASES: ReadonlySet<Phase> = new Set<Phase>(['move', 'write']);

/** Below this much time in a phase a rate is noise (the first chunk lands in the page cache). */
const MIN_RATE_MS = 100;

/** Where a conversion (or a stream) stands: the current phase and how far, how fast, how long to go. */
export interface PhaseSnapshot<P extends string> {
  phase: P;
  /** 1-based position in the tracker's phase order. */
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

export type Snapshot = PhaseSnapshot<Phase>;

/**
 * Tracks phases of any kind of run: the conversion's (ProgressTracker) and the stream commands' phases
 * (src/stream/progress.ts) share it. Only `bytePhases` get a rate.
 */
export class PhaseTracker<P extends string> {
  private current: { phase: P; startedAt: number; bytesDone: number; bytesTotal: number } | undefined;
  readonly startedAt: number;

  constructor(
    private readonly order: readonly P[],
    private readonly bytePhases: ReadonlySet<P>,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.startedAt = now();
  }

  /** Records an event; true when it begins a new phase. */
  update(e: { phase: P; bytesDone: number; bytesTotal: number }): boolean {
    const begins = this.current?.phase !== e.phase;
    if (begins) this.current = { phase: e.phase, startedAt: this.now(), bytesDone: e.bytesDone, bytesTotal: e.bytesTotal };
    else {
      this.current!.bytesDone = e.bytesDone;
      this.current!.bytesTotal = e.bytesTotal;
    }
    return begins;
  }

  get phase(): P | undefined {
    return this.current?.phase;
  }

  elapsedMs(): number {
    return this.now() - this.startedAt;
  }

  /** The current state; undefined before the first event. */
  snapshot(): PhaseSnapshot<P> | undefined {
    const c = this.current;
    if (!c) return undefined;
    const now = this.now();
    const inPhase = now - c.startedAt;
    const rate = this.bytePhases.has(c.phase) && inPhase >= MIN_RATE_MS && c.bytesDone > 0 ? Math.round((c.bytesDone * 1000) / inPhase) : 0;
    return {
      phase: c.phase,
      phaseIndex: this.order.indexOf(c.phase) + 1,
      bytesDone: c.bytesDone,
      bytesTotal: c.bytesTotal,
      rate,
      etaSeconds: rate > 0 ? Math.max(0, c.bytesTotal - c.bytesDone) / rate : null,
      elapsedMs: Math.round(now - this.startedAt),
      phaseElapsedMs: Math.round(inPhase),
    };
  }
}

/** The conversion's phases (PHASES), `move` and `write` counting bytes. */
export class ProgressTracker extends PhaseTracker<Phase> {
  constructor(now?: () => number) {
    super(PHASES, BYTE_PHASES, now);
  }
}

/** Whole percent of a phase (100 for an empty phase). */
export function percent(s: { bytesDone: number; bytesTotal: number }): number {
  return s.bytesTotal > 0 ? Math.floor((Math.min(s.bytesDone, s.bytesTotal) * 100) / s.bytesTotal) : 100;
}
