/**
 * What check() reports and mapping() refuses: problems found in a VHD, by severity and kind.
 */
import type { CheckReport } from '../../src/driver.js';

/** check() lists at most this many problems of one kind, then a count. */
export const MAX_MESSAGES = 100;

export type Severity = 'fatal' | 'corruption' | 'leak' | 'warning';

export interface Problem {
  /** fatal: mapping() refuses; fatal, corruption, leak: counted by check(); warning: reported only. */
  severity: Severity;
  kind: string;
  message: string;
  field: string;
  value: unknown;
}

/**
 * Problems found, counted per kind; only the first MAX_MESSAGES of a kind are kept, so a hostile BAT
 * whose million entries all overlap costs a count, not a million messages.
 */
export class Findings {
  readonly list: Problem[] = [];
  readonly counts = new Map<string, { n: number; severity: Severity }>();

  add(severity: Severity, kind: string, field: string, value: unknown, message: string): void {
    const c = this.counts.get(kind) ?? { n: 0, severity };
    c.n++;
    this.counts.set(kind, c);
    if (c.n <= MAX_MESSAGES) this.list.push({ severity, kind, field, value, message });
  }

  /** Takes over another collection's findings (kinds are distinct between collectors). */
  merge(other: Findings): void {
    this.list.push(...other.list);
    for (const [kind, c] of other.counts) this.counts.set(kind, c);
  }

  firstFatal(): Problem | undefined {
    return this.list.find((p) => p.severity === 'fatal');
  }

  /** Adds these findings to a check report. */
  report(r: CheckReport): void {
    for (const p of this.list) r.messages.push(`${LABEL[p.severity]}: ${p.message}`);
    for (const [kind, c] of this.counts) {
      if (c.severity === 'leak') r.leaks += c.n;
      else if (c.severity !== 'warning') r.corruptions += c.n;
      if (c.n > MAX_MESSAGES) r.messages.push(`(${c.n - MAX_MESSAGES} more "${kind}" findings not shown)`);
    }
  }
}

const LABEL: Record<Severity, string> = { fatal: 'ERROR', corruption: 'ERROR', leak: 'Leaked', warning: 'Warning' };
