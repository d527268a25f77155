/**
 * Comparing guest mappings with `qemu-img map --output=json`. Both sides are normalised first so
 * that only differences QEMU itself would call meaningful remain:
 *
 * - `zero` on data:true entries is dropped: QEMU sets it only when it asked the file layer about
 *   holes (data over a file hole), which depends on the host filesystem, not on the image.
 * - `compressed` is dropped (qemu 7.2 omits it from its JSON).
 * - `filename` is dropped (QEMU prints it only for some layers; the depth already says which).
 * - Adjacent entries are merged when depth, present, data and (for data:false entries) zero are
 *   equal and their offsets continue (or neither has one): QEMU splits runs at its own internal
 *   boundaries (L2 tables, extents, block-status chunks), which carry no meaning.
 */

/** One entry as `qemu-img map --output=json` or `imgconv map --output json` prints it. */
export interface RawMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed?: boolean;
  offset?: number;
  filename?: string;
}

/** A normalised entry: `zero` is meaningful only when `data` is false (and false otherwise). */
export interface NormalMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export function normaliseMap(entries: readonly RawMapEntry[]): NormalMapEntry[] {
  const out: NormalMapEntry[] = [];
  for (const e of entries) {
    if (e.length === 0) continue;
    const n: NormalMapEntry = {
      start: e.start,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.data ? false : e.zero,
      data: e.data,
    };
    if (e.offset !== undefined) n.offset = e.offset;
    const p = out[out.length - 1];
    if (p && canMerge(p, n)) p.length += n.length;
    else out.push(n);
  }
  return out;
}

function canMerge(p: NormalMapEntry, n: NormalMapEntry): boolean {
  if (p.start + p.length !== n.start) return false;
  if (p.depth !== n.depth || p.present !== n.present || p.data !== n.data || p.zero !== n.zero) return false;
  if (p.offset === undefined || n.offset === undefined) return p.offset === undefined && n.offset === undefined;
  return p.offset + p.length === n.offset;
}

/** Parses map JSON (qemu-img's or imgconv's) and checks every entry has the required fields. */
export function parseMapJson(text: string): RawMapEntry[] {
  const v: unknown = JSON.parse(text);
  if (!Array.isArray(v)) throw new Error('map JSON is not an array');
  return v.map((x: unknown, i) => {
    const e = x as Record<string, unknown>;
    for (const k of ['start', 'length', 'depth'] as const) {
      if (typeof e[k] !== 'number') throw new Error(`map entry ${i}: "${k}" is not a number`);
    }
    for (const k of ['present', 'zero', 'data'] as const) {
      if (typeof e[k] !== 'boolean') throw new Error(`map entry ${i}: "${k}" is not a boolean`);
    }
    if (e.offset !== undefined && typeof e.offset !== 'number') throw new Error(`map entry ${i}: "offset" is not a number`);
    return e as unknown as RawMapEntry;
  });
}

export function describeEntry(e: NormalMapEntry | undefined): string {
  if (!e) return '(nothing)';
  const kind = e.data ? 'data' : e.zero ? 'zero' : 'nodata';
  const off = e.offset !== undefined ? ` @${e.offset}` : '';
  return `[${e.start}, +${e.length}) depth ${e.depth} ${e.present ? 'present' : 'absent'} ${kind}${off}`;
}

function sameEntry(a: NormalMapEntry, b: NormalMapEntry): boolean {
  return (
    a.start === b.start &&
    a.length === b.length &&
    a.depth === b.depth &&
    a.present === b.present &&
    a.zero === b.zero &&
    a.data === b.data &&
    a.offset === b.offset
  );
}

/**
 * The first difference between two maps after normalisation, as one readable line, or null when
 * they are equal. `a` is taken as the expectation (qemu-img), `b` as the answer (imgconv).
 */
export function diffMaps(
  a: readonly RawMapEntry[],
  b: readonly RawMapEntry[],
  labels: { a: string; b: string } = { a: 'qemu-img', b: 'imgconv' },
): string | null {
  const na = normaliseMap(a);
  const nb = normaliseMap(b);
  const n = Math.max(na.length, nb.length);
  for (let i = 0; i < n; i++) {
    const x = na[i];
    const y = nb[i];
    if (x && y && sameEntry(x, y)) continue;
    const at = Math.min(x?.start ?? Infinity, y?.start ?? Infinity);
    return (
      `maps differ at entry ${i} (guest offset ${at}; ${na.length} vs ${nb.length} entries): ` +
      `${labels.a} ${describeEntry(x)}; ${labels.b} ${describeEntry(y)}`
    );
  }
  return null;
}
