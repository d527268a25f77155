/**
 * The `--progress json` schema as a check (README, "Progress output"): every line parses, the
 * fields every event carries are there with their types, phases come in order, bytesDone never
 * exceeds bytesTotal, and exactly one final event (done or error) ends the stream.
 */
import { expect } from 'vitest';
import { PHASES } from '../../src/engine/convert.js';

export interface JsonEvent {
  event: 'phase' | 'progress' | 'stopping' | 'done' | 'error';
  phase: (typeof PHASES)[number] | null;
  bytesDone: number;
  bytesTotal: number;
  rate: number;
  etaSeconds: number | null;
  elapsedMs: number;
  [k: string]: unknown;
}

export function checkJsonEvents(text: string): JsonEvent[] {
  expect(text.endsWith('\n'), 'the stream ends with a newline').toBe(true);
  const lines = text.slice(0, -1).split('\n');
  const events = lines.map((l, i) => {
    let v: unknown;
    expect(() => (v = JSON.parse(l)), `line ${i + 1} is JSON: ${l}`).not.toThrow();
    expect(typeof v === 'object' && v !== null && !Array.isArray(v), `line ${i + 1} is an object`).toBe(true);
    return v as JsonEvent;
  });
  let phaseIndex = -1;
  let lastElapsed = 0;
  for (const [i, e] of events.entries()) {
    const where = `event ${i + 1} ${JSON.stringify(e)}`;
    expect(['phase', 'progress', 'stopping', 'done', 'error'], where).toContain(e.event);
    expect(e.phase === null || PHASES.includes(e.phase), where).toBe(true);
    for (const k of ['bytesDone', 'bytesTotal', 'rate', 'elapsedMs'] as const) {
      expect(Number.isFinite(e[k]) && e[k] >= 0, `${where}: ${k}`).toBe(true);
    }
    expect(Number.isInteger(e.bytesDone) && Number.isInteger(e.bytesTotal), where).toBe(true);
    expect(e.etaSeconds === null || (Number.isFinite(e.etaSeconds) && e.etaSeconds >= 0), `${where}: etaSeconds`).toBe(true);
    expect(e.bytesDone, `${where}: bytesDone ≤ bytesTotal`).toBeLessThanOrEqual(e.bytesTotal);
    expect(e.elapsedMs, `${where}: elapsedMs never goes back`).toBeGreaterThanOrEqual(lastElapsed);
    lastElapsed = e.elapsedMs;
    if (e.event === 'phase') {
      const idx = PHASES.indexOf(e.phase!);
      expect(idx, `${where}: phases in order`).toBeGreaterThan(phaseIndex);
      phaseIndex = idx;
    } else if (e.phase !== null) {
      expect(PHASES.indexOf(e.phase), `${where}: in the phase last announced`).toBe(phaseIndex);
    }
    const final = e.event === 'done' || e.event === 'error';
    expect(final, `${where}: only the last event is final`).toBe(i === events.length - 1);
    if (e.event === 'done') {
      for (const k of ['image', 'source', 'target']) expect(typeof e[k], `${where}: ${k}`).toBe('string');
      for (const k of ['metadataBytes', 'dataBytes', 'compactionBytes', 'reclaimedBytes', 'fileLength', 'finalLength']) expect(typeof e[k], `${where}: ${k}`).toBe('number');
      expect(Array.isArray(e.verified) && (e.verified as unknown[]).length > 0, `${where}: verified`).toBe(true);
      expect(Array.isArray(e.dropped), `${where}: dropped`).toBe(true);
    }
    if (e.event === 'error') {
      expect(typeof e.message, where).toBe('string');
      expect([null, 'untouched', 'rolled-back', 'converted', 'needs-recover'], `${where}: imageState`).toContain(e.imageState);
      expect(e.recover === null || (typeof e.recover === 'string' && (e.recover as string).startsWith('imgconv recover ')), `${where}: recover`).toBe(true);
      expect(e.recover !== null, `${where}: a recover command exactly when needed`).toBe(e.imageState === 'needs-recover');
    }
  }
  return events;
}
