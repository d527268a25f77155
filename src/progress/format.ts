/**
 * Compact numbers for live progress: one decimal, so a counter that changes every frame keeps its
 * width (the CLI's humanSize prints exact-looking values for the final report instead).
 */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 0 B, 512 B, 1.5 KiB, 41.7 MiB. */
export function bytes(n: number): string {
  let u = 0;
  let v = n;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${Math.round(n)} B` : `${v.toFixed(1)} ${UNITS[u]}`;
}

export function rate(bytesPerSecond: number): string {
  return `${bytes(bytesPerSecond)}/s`;
}

/** "52.1 MiB/s", "ETA 0:07": what is known of a phase's speed and time left (nothing yet, no ETA once done). */
export function speedAndEta(s: { rate: number; etaSeconds: number | null; bytesDone: number; bytesTotal: number }): string[] {
  const out: string[] = [];
  if (s.rate > 0) out.push(rate(s.rate));
  if (s.etaSeconds !== null && s.bytesDone < s.bytesTotal) out.push(`ETA ${clock(s.etaSeconds)}`);
  return out;
}

/** 0:07, 1:05:09. */
export function clock(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** 0.4 s, 12.3 s, 2:05 (elapsed times). */
export function duration(ms: number): string {
  return ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : clock(ms / 1000);
}

/** A path as it can be pasted into a POSIX shell. */
export function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
