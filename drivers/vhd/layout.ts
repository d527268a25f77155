/**
 * The host layout of a dynamic or differencing VHD, for hostSpace(), mapping() and check().
 */
import type { HostRole } from '../../src/host-space.js';
import { BAT_UNUSED, DYN_HEADER_SIZE, FOOTER_SIZE, printable } from './format.js';
import { Findings } from './findings.js';
import { VHD_SECTOR } from './geometry.js';
import type { DynamicState } from './open.js';

export interface Structure {
  start: number;
  length: number;
  role: HostRole;
  what: string;
}

export interface Layout {
  structures: Structure[];
  /** BAT indices of allocated blocks, sorted by host offset. */
  order: Uint32Array;
  problems: Findings;
}

/**
 * Where every structure and block of a dynamic/differencing disk lies, and what is wrong with it:
 * blocks past the end of the file (QEMU refuses those at open), blocks over each other or over
 * metadata, structures over each other. One pass over the BAT plus a sort.
 */
export function analyseLayout(d: DynamicState, fileSize: number): Layout {
  const structures: Structure[] = [
    { start: 0, length: FOOTER_SIZE, role: 'header', what: 'footer copy' },
    { start: d.headerOffset, length: DYN_HEADER_SIZE, role: 'header', what: 'dynamic header' },
    { start: d.tableOffset, length: Math.ceil((d.entries * 4) / VHD_SECTOR) * VHD_SECTOR, role: 'metadata', what: 'BAT' },
  ];
  for (const l of d.locators) {
    if (l.offset !== undefined && l.space) structures.push({ start: l.offset, length: l.space, role: 'metadata', what: `parent locator ${l.index} (${printable(l.code)})` });
  }
  if (d.eofFooter) structures.push({ start: fileSize - FOOTER_SIZE, length: FOOTER_SIZE, role: 'header', what: 'footer' });
  structures.sort((a, b) => a.start - b.start);

  const problems = new Findings();
  const fatal = (kind: string, field: string, value: unknown, message: string) => problems.add('fatal', kind, field, value, message);
  for (let i = 0; i < structures.length; i++) {
    for (let j = i + 1; j < structures.length; j++) {
      const a = structures[i]!;
      const b = structures[j]!;
      if (b.start < a.start + a.length) {
        fatal('overlapping structures', b.what, b.start, `${b.what} at ${b.start} (+${b.length}) overlaps ${a.what} at ${a.start} (+${a.length})`);
      }
    }
  }

  const allocated: number[] = [];
  for (let k = 0; k < d.entries; k++) if (d.bat[k] !== BAT_UNUSED) allocated.push(k);
  const order = Uint32Array.from(allocated).sort((a, b) => d.bat[a]! - d.bat[b]! || a - b);
  // Every block spans the same bitmap + data bytes, so in host order a block can only overlap its
  // predecessor, and the blocks reaching into a structure are the last ones starting before its end.
  const span = d.bitmapSize + d.blockSize;
  const at = (k: number) => d.bat[k]! * VHD_SECTOR;
  const blockName = (k: number) => `block ${k} (BAT sector ${d.bat[k]}, bytes ${at(k)}..${at(k) + span})`;
  for (let i = 0; i < order.length; i++) {
    const k = order[i]!;
    if (at(k) + span > fileSize) {
      fatal('block past end of file', `BAT entry ${k}`, d.bat[k], `${blockName(k)} runs past the end of the file (${fileSize} bytes); QEMU: "free_data_block_offset points after the end of file"`);
    }
    if (i > 0 && at(k) < at(order[i - 1]!) + span) {
      fatal('overlapping blocks', `BAT entry ${k}`, d.bat[k], `${blockName(k)} overlaps ${blockName(order[i - 1]!)}`);
    }
  }
  for (const s of structures) {
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (at(order[mid]!) < s.start + s.length) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo - 1; i >= 0 && at(order[i]!) + span > s.start; i--) {
      const k = order[i]!;
      fatal('block over metadata', `BAT entry ${k}`, d.bat[k], `${blockName(k)} overlaps the ${s.what} at ${s.start} (+${s.length})`);
    }
  }
  return { structures, order, problems };
}
