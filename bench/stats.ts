/** Summaries over repeated runs and the number formats of the report. */

export interface Summary {
  min: number;
  median: number;
  max: number;
  n: number;
}

export function summarize(values: number[]): Summary {
  if (values.length === 0) throw new Error('summarize: no values');
  const s = values.slice().sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { min: s[0]!, median, max: s[s.length - 1]!, n: s.length };
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** A number with a fixed count of significant decimals, no exponent (so the report parses simply). */
export function num(v: number, decimals = 2): string {
  if (!Number.isFinite(v)) throw new Error(`num: ${v} is not finite`);
  return v.toFixed(decimals);
}

/** "median (min–max)" in one unit. Single runs print just the value. */
export function mmm(s: Summary, scale: number, decimals = 2): string {
  if (s.n === 1) return num(s.median / scale, decimals);
  return `${num(s.median / scale, decimals)} (${num(s.min / scale, decimals)}–${num(s.max / scale, decimals)})`;
}

export function sizeLabel(bytes: number): string {
  if (bytes >= TiB && bytes % TiB === 0) return `${bytes / TiB} TiB`;
  if (bytes >= GiB && bytes % GiB === 0) return `${bytes / GiB} GiB`;
  if (bytes >= MiB && bytes % MiB === 0) return `${bytes / MiB} MiB`;
  return `${bytes} B`;
}

/** A markdown table; every row must have as many cells as the header. */
export function table(header: string[], rows: string[][]): string {
  for (const r of rows) if (r.length !== header.length) throw new Error(`table row has ${r.length} cells, header ${header.length}: ${r.join(' | ')}`);
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}
