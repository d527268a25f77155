/**
 * A small picture of the host file: a strip of cells, each showing what most of its bytes hold
 * (header, tables, data or free space). Pure: it works on the ranges of a HostSpace
 * (hostSpace().ranges() and the file size), so a test can draw any layout.
 */
import type { HostRole } from '../host-space.js';

/** Tables are "old" in the source before a conversion and "new" in its result. */
export type HostCell = 'header' | 'old-tables' | 'new-tables' | 'data' | 'free';

export interface HostLayout {
  fileSize: number;
  ranges: readonly { start: number; length: number; role: HostRole }[];
}

export const CELL_GLYPH: Record<HostCell, string> = {
  header: 'H',
  'old-tables': '▒',
  'new-tables': '▓',
  data: '█',
  free: '·',
};

export const CELL_LABEL: Record<HostCell, string> = {
  header: 'header',
  'old-tables': 'old tables',
  'new-tables': 'new tables',
  data: 'data',
  free: 'free',
};

export const STRIP_CELLS = 60;

/** Smaller index wins a tie: structures over data over free space. */
const KINDS = ['header', 'tables', 'data', 'free'] as const;
type Kind = (typeof KINDS)[number];
const KIND_OF_ROLE: Record<HostRole, Kind> = { header: 'header', metadata: 'tables', data: 'data' };

/**
 * One cell per `bytesPerCell` bytes of the file (the last one may cover less). A cell that holds
 * any header shows the header; otherwise the kind with the most bytes in it. Tables that would get
 * no cell (a few tables among gigabytes of data) get the cell where they are densest, so the picture
 * never hides that tables exist.
 */
export function hostStrip(layout: HostLayout, tables: 'old' | 'new', bytesPerCell: number): HostCell[] {
  const size = layout.fileSize;
  if (size <= 0 || bytesPerCell <= 0) return [];
  const n = Math.ceil(size / bytesPerCell);
  const used: Record<Exclude<Kind, 'free'>, Float64Array> = {
    header: new Float64Array(n),
    tables: new Float64Array(n),
    data: new Float64Array(n),
  };
  for (const r of layout.ranges) {
    const kind = KIND_OF_ROLE[r.role] as Exclude<Kind, 'free'>;
    const end = Math.min(r.start + r.length, size);
    for (let pos = Math.max(0, r.start); pos < end; ) {
      const cell = Math.floor(pos / bytesPerCell);
      const cellEnd = Math.min((cell + 1) * bytesPerCell, end);
      used[kind][cell]! += cellEnd - pos;
      pos = cellEnd;
    }
  }
  const bytesIn = (kind: Kind, cell: number): number => {
    if (kind !== 'free') return used[kind][cell]!;
    const span = Math.min((cell + 1) * bytesPerCell, size) - cell * bytesPerCell;
    return Math.max(0, span - used.header[cell]! - used.tables[cell]! - used.data[cell]!);
  };
  const kinds: Kind[] = [];
  for (let c = 0; c < n; c++) {
    let best: Kind = used.header[c]! > 0 ? 'header' : 'free';
    if (best !== 'header') {
      let most = -1;
      for (const k of KINDS.slice(1)) {
        const b = bytesIn(k, c);
        if (b > most) {
          most = b;
          best = k;
        }
      }
    }
    kinds.push(best);
  }
  if (!kinds.includes('tables')) {
    let where = -1;
    for (let c = 0; c < n; c++) if (kinds[c] !== 'header' && used.tables[c]! > 0 && (where < 0 || used.tables[c]! > used.tables[where]!)) where = c;
    if (where >= 0) kinds[where] = 'tables';
  }
  return kinds.map((k) => (k === 'tables' ? (tables === 'old' ? 'old-tables' : 'new-tables') : k));
}

/**
 * The before and after strips on one scale (the larger file spans STRIP_CELLS cells), so a file that
 * grew or shrank shows it.
 */
export function hostPictures(
  before: HostLayout,
  after?: HostLayout,
  cells = STRIP_CELLS,
): { before: HostCell[]; after?: HostCell[]; bytesPerCell: number } {
  const largest = Math.max(before.fileSize, after?.fileSize ?? 0);
  const bytesPerCell = Math.max(1, Math.ceil(largest / cells));
  return {
    before: hostStrip(before, 'old', bytesPerCell),
    ...(after ? { after: hostStrip(after, 'new', bytesPerCell) } : {}),
    bytesPerCell,
  };
}

export function stripText(cells: readonly HostCell[]): string {
  return cells.map((c) => CELL_GLYPH[c]).join('');
}
