/**
 * VHD (QEMU "vpc"): fixed, dynamic and differencing disks, read side.
 *
 * Opening follows QEMU's vpc_open: "conectix" at offset 0 means a dynamic or differencing disk and
 * the copy of the footer there is the one used; otherwise the last 512 bytes must be a fixed disk's
 * footer. A bad footer checksum is refused (modern QEMU: "Incorrect header checksum"). The virtual
 * size is QEMU's (see geometry.ts). Dynamic disks map like QEMU reads them: an allocated block is data
 * for its whole length (QEMU ignores the sector bitmap), an unallocated one reads as zeros.
 * Differencing disks are read as the spec says — the bitmap decides per sector, clear bits and
 * unallocated blocks come from the parent found through the parent locators — where QEMU opens them
 * as plain dynamic disks without a parent.
 *
 * Opening validates the headers (what QEMU validates, plus bounds before any allocation). Where the
 * blocks lie — past the end of the file, over each other or over metadata — is analysed on first
 * use: mapping() refuses such an image with a FormatError, check() lists every problem.
 */
import { MAX_SAFE, isPowerOfTwo, requireInFile, safeU64 } from '../../src/binary.js';
import { readAt, readExact, type BlockDevice } from '../../src/blockdev/types.js';
import type { BackingRef, CheckReport, FormatDriver, ImageInfo, OpenContext, ProbeInput, SourceImage } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace, type HostRole } from '../../src/host-space.js';
import {
  BAT_UNUSED,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_CHECKSUM_OFFSET,
  DYN_COOKIE,
  DYN_HEADER_SIZE,
  FEATURE_RESERVED,
  FEATURE_TEMPORARY,
  FOOTER_CHECKSUM_OFFSET,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  FORMAT,
  VHD_VERSION,
  bitmapTest,
  decodeDynHeader,
  decodeFooter,
  footerChecksumOk,
  formatUuid,
  hasCookie,
  printable,
  qemuBitmapSize,
  vhdChecksum,
  vhdTimestampIso,
  type DynHeader,
  type VhdFooter,
} from './format.js';
import { VHD_MAX_SECTORS, VHD_SECTOR, sizeSource, virtualSectors } from './geometry.js';
import { chooseParent, parentCandidates, readLocators, type LocatorInfo, type ParentChoice } from './parent.js';

export * from './format.js';
export * from './geometry.js';

/** The BAT is read whole; beyond this (64 Mi entries: 128 TiB of 2 MiB blocks) imgconv refuses. */
export const MAX_BAT_BYTES = 256 * 1024 * 1024;
/** QEMU refuses max_table_entries above INT_MAX / 4. */
const QEMU_MAX_TABLE_ENTRIES = Math.floor(0x7fffffff / 4);
/** check() lists at most this many problems of one kind, then a count. */
const MAX_MESSAGES = 100;

type Subformat = 'fixed' | 'dynamic' | 'differencing';

/** Where the footer in use was found and what it says. */
interface LocatedFooter {
  buf: Uint8Array;
  at: number;
  footer: VhdFooter;
}

/**
 * QEMU's rule: "conectix" at offset 0 is the footer copy of a dynamic/differencing disk; otherwise the
 * last 512 bytes. A footer only in the last 511 bytes is a pre-2004 Virtual PC file, refused (QEMU
 * refuses it too, "invalid VPC image").
 */
async function locateFooter(dev: BlockDevice, fileSize: number): Promise<LocatedFooter> {
  if (fileSize >= FOOTER_SIZE) {
    const head = await readAt(dev, 0, FOOTER_SIZE);
    if (hasCookie(head, FOOTER_COOKIE)) return { buf: head, at: 0, footer: decodeFooter(head) };
  }
  const tail = await readAt(dev, Math.max(0, fileSize - FOOTER_SIZE), Math.min(fileSize, FOOTER_SIZE));
  if (tail.length === FOOTER_SIZE && hasCookie(tail, FOOTER_COOKIE)) {
    return { buf: tail, at: fileSize - FOOTER_SIZE, footer: decodeFooter(tail) };
  }
  if (tail.length >= FOOTER_SIZE - 1 && hasCookie(tail, FOOTER_COOKIE, tail.length - (FOOTER_SIZE - 1))) {
    throw new UnsupportedError(
      FORMAT,
      '511-byte footer',
      `${dev.path} ends with the 511-byte footer of Virtual PC before 2004; QEMU refuses such files too ("invalid VPC image"). Append one zero byte to make it a 512-byte footer`,
    );
  }
  if (fileSize < FOOTER_SIZE) throw new FormatError(FORMAT, 'file size', fileSize, 'too small for a 512-byte VHD footer');
  throw new FormatError(FORMAT, 'footer cookie', printable(new TextDecoder('latin1').decode(tail.subarray(0, 8))), 'no "conectix" footer at offset 0 or in the last 512 bytes');
}

function subformatOf(lf: LocatedFooter): Subformat {
  const t = lf.footer.diskType;
  const known: Record<number, Subformat> = { [DISK_FIXED]: 'fixed', [DISK_DYNAMIC]: 'dynamic', [DISK_DIFFERENCING]: 'differencing' };
  const sub = known[t];
  if (sub === undefined) {
    if (t === 1 || t === 5 || t === 6) throw new UnsupportedError(FORMAT, 'disk type', `footer disk type ${t} is reserved (deprecated) in the VHD specification`);
    throw new FormatError(FORMAT, 'footer disk type', t, 'must be 2 (fixed), 3 (dynamic) or 4 (differencing)');
  }
  if (lf.at === 0 && sub === 'fixed') {
    throw new FormatError(FORMAT, 'footer disk type', t, 'a fixed disk has its footer only at the end of the file, but this one is at offset 0 (where dynamic disks keep a copy)');
  }
  if (lf.at !== 0 && sub !== 'fixed') {
    throw new FormatError(FORMAT, 'footer disk type', t, `a ${sub} disk keeps a copy of its footer at offset 0, and this file has none (QEMU would misread it as fixed)`);
  }
  return sub;
}

interface DynamicState {
  headerOffset: number;
  /** The 1024 header bytes as read. */
  headerRaw: Uint8Array;
  header: DynHeader;
  headerChecksumOk: boolean;
  tableOffset: number;
  entries: number;
  blockSize: number;
  bitmapSize: number;
  bat: Uint32Array;
  locators: LocatorInfo[];
  parent?: ParentChoice;
  /** The footer at the end of the file, when it is one (cookie present). */
  eofFooter?: { buf: Uint8Array; checksumOk: boolean; differs: string[] };
}

type Severity = 'fatal' | 'corruption' | 'leak' | 'warning';

interface Problem {
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
class Findings {
  readonly list: Problem[] = [];
  readonly counts = new Map<string, { n: number; severity: Severity }>();

  add(severity: Severity, kind: string, field: string, value: unknown, message: string): void {
    const c = this.counts.get(kind) ?? { n: 0, severity };
    c.n++;
    this.counts.set(kind, c);
    if (c.n <= MAX_MESSAGES) this.list.push({ severity, kind, field, value, message });
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

interface Structure {
  start: number;
  length: number;
  role: HostRole;
  what: string;
}

interface Layout {
  structures: Structure[];
  /** BAT indices of allocated blocks, sorted by host offset. */
  order: Uint32Array;
  problems: Findings;
}

const FOOTER_FIELDS: Array<[string, number, number]> = [
  ['features', 8, 4],
  ['version', 12, 4],
  ['data offset', 16, 8],
  ['timestamp', 24, 4],
  ['creator', 28, 12],
  ['original size', 40, 8],
  ['current size', 48, 8],
  ['geometry', 56, 4],
  ['disk type', 60, 4],
  ['checksum', 64, 4],
  ['unique id', 68, 16],
  ['saved state', 84, 1],
  ['reserved', 85, 427],
];

function footerDifferences(a: Uint8Array, b: Uint8Array): string[] {
  return FOOTER_FIELDS.filter(([, at, len]) => !Buffer.from(a.subarray(at, at + len)).equals(Buffer.from(b.subarray(at, at + len)))).map(([n]) => n);
}

function u64Detail(v: bigint): number | string {
  return v <= BigInt(MAX_SAFE) ? Number(v) : v.toString();
}

class VhdImage implements SourceImage {
  readonly format = FORMAT;
  readonly dataDev: BlockDevice;
  private layoutCache: Layout | undefined;
  private mapCache: ExtentMap | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly info: ImageInfo,
    private readonly fileSize: number,
    private readonly subformat: Subformat,
    private readonly lf: LocatedFooter,
    private readonly dyn: DynamicState | undefined,
  ) {
    this.dataDev = dev;
  }

  private get virtualSize(): number {
    return this.info.virtualSize;
  }

  async mapping(): Promise<ExtentMap> {
    if (this.mapCache) return this.mapCache;
    const map = new ExtentMap(this.virtualSize);
    const d = this.dyn;
    if (!d) {
      // Fixed: guest byte x is file byte x. QEMU reports the whole disk as data (block status
      // DATA|RECURSE); holes in the file then show as zero:true data:true in qemu-img map.
      map.push({ guest: 0, length: this.virtualSize, kind: 'data', host: 0 });
      return (this.mapCache = map);
    }
    const fatal = this.layout().problems.firstFatal();
    if (fatal) throw new FormatError(FORMAT, fatal.field, fatal.value, fatal.message);
    const diff = this.subformat === 'differencing';
    const blocks = Math.ceil(this.virtualSize / d.blockSize);
    for (let k = 0; k < blocks; k++) {
      const guest = k * d.blockSize;
      const length = Math.min(d.blockSize, this.virtualSize - guest);
      const entry = d.bat[k]!;
      if (entry === BAT_UNUSED) {
        map.push({ guest, length, kind: diff ? 'unallocated' : 'zero' });
        continue;
      }
      const host = entry * VHD_SECTOR + d.bitmapSize;
      if (!diff) {
        map.push({ guest, length, kind: 'data', host });
        continue;
      }
      const bitmap = await readExact(this.dev, entry * VHD_SECTOR, d.bitmapSize, (got) =>
        new FormatError(FORMAT, `block ${k} bitmap`, entry * VHD_SECTOR, `ends after ${got} bytes, at the end of the file`),
      );
      const sectors = length / VHD_SECTOR;
      let s = 0;
      while (s < sectors) {
        const present = bitmapTest(bitmap, s);
        let e = s + 1;
        while (e < sectors) {
          if ((e & 7) === 0 && e + 8 <= sectors) {
            const byte = bitmap[e >> 3]!;
            if (byte === (present ? 0xff : 0x00)) {
              e += 8;
              continue;
            }
          }
          if (bitmapTest(bitmap, e) !== present) break;
          e++;
        }
        const g = guest + s * VHD_SECTOR;
        const len = (e - s) * VHD_SECTOR;
        map.push(present ? { guest: g, length: len, kind: 'data', host: host + s * VHD_SECTOR } : { guest: g, length: len, kind: 'unallocated' });
        s = e;
      }
    }
    return (this.mapCache = map);
  }

  async hostSpace(): Promise<HostSpace> {
    const hs = new HostSpace(FORMAT, this.fileSize);
    const d = this.dyn;
    if (!d) {
      hs.add(0, this.virtualSize, 'data', 'data');
      hs.add(this.lf.at, FOOTER_SIZE, 'header', 'footer');
      return hs;
    }
    // Structures as found: overlaps surface from HostSpace.finish(), blocks past the end of the file
    // as ranges beyond fileSize; check() and mapping() name them.
    const layout = this.layout();
    for (const s of layout.structures) hs.add(s.start, s.length, s.role, s.what);
    for (const k of layout.order) {
      const at = d.bat[k]! * VHD_SECTOR;
      hs.add(at, d.bitmapSize, 'metadata', 'block bitmap');
      hs.add(at + d.bitmapSize, d.blockSize, 'data', 'block data');
    }
    return hs;
  }

  async check(): Promise<CheckReport> {
    const report: CheckReport = { format: FORMAT, corruptions: 0, leaks: 0, checkErrors: 0, messages: [], imageEndOffset: this.fileSize };
    const findings = new Findings();
    this.headerProblems(findings);
    const d = this.dyn;
    if (!d) {
      findings.report(report);
      return report;
    }
    const layout = this.layout();
    const span = d.bitmapSize + d.blockSize;
    let end = 0;
    for (const s of layout.structures) end = Math.max(end, s.start + s.length);
    if (layout.order.length) end = Math.max(end, d.bat[layout.order[layout.order.length - 1]!]! * VHD_SECTOR + span);
    report.imageEndOffset = end;
    // Leaks: file space nothing references (meaningful only when nothing overlaps).
    if (!layout.problems.firstFatal()) {
      for (const f of (await this.hostSpace()).free()) {
        findings.add('leak', 'leak', 'free space', f.start, `${f.length} bytes at offset ${f.start} are not referenced by any structure`);
      }
    }
    for (const p of layout.problems.list) findings.list.push(p);
    for (const [kind, c] of layout.problems.counts) findings.counts.set(kind, c);
    findings.report(report);
    const blocks = Math.ceil(this.virtualSize / d.blockSize);
    let allocated = 0;
    let fragmented = 0;
    for (let k = 0; k < blocks; k++) {
      const e = d.bat[k]!;
      if (e === BAT_UNUSED) continue;
      allocated++;
      if (k > 0 && d.bat[k - 1] !== BAT_UNUSED && d.bat[k - 1]! * VHD_SECTOR + span !== e * VHD_SECTOR) fragmented++;
    }
    report.totalClusters = blocks;
    report.allocatedClusters = allocated;
    report.fragmentedClusters = fragmented;
    return report;
  }

  async close(): Promise<void> {}

  /** Findings about the footer and header fields that do not stop reading. */
  private headerProblems(out: Findings): void {
    const f = this.lf.footer;
    const warn = (kind: string, field: string, value: unknown, message: string) => out.add('warning', kind, field, value, message);
    const bad = (kind: string, field: string, value: unknown, message: string) => out.add('corruption', kind, field, value, message);
    if (!(f.features & FEATURE_RESERVED)) warn('footer', 'footer features', f.features, `footer features 0x${f.features.toString(16)} lack the reserved bit 0x2 the specification requires`);
    if (f.version !== VHD_VERSION) warn('footer', 'footer version', f.version, `footer version 0x${f.version.toString(16)} is not 0x10000`);
    if (this.subformat === 'fixed' && f.dataOffset !== 0xffffffffffffffffn && f.dataOffset !== 0xffffffffn) {
      warn('footer', 'footer data offset', f.dataOffset, `fixed disk footer data offset ${f.dataOffset} is not all ones`);
    }
    const d = this.dyn;
    if (!d) return;
    if (!d.headerChecksumOk) {
      const computed = vhdChecksum(d.headerRaw, DYN_CHECKSUM_OFFSET);
      bad('checksum', 'dynamic header checksum', d.header.checksum, `dynamic header checksum 0x${d.header.checksum.toString(16)} does not match the computed 0x${computed.toString(16)} (QEMU ignores it)`);
    }
    if (d.header.version !== VHD_VERSION) warn('header', 'dynamic header version', d.header.version, `dynamic header version 0x${d.header.version.toString(16)} is not 0x10000`);
    if (d.header.dataOffset !== 0xffffffffffffffffn && d.header.dataOffset !== 0xffffffffn) {
      warn('header', 'dynamic header data offset', d.header.dataOffset, `dynamic header data offset ${d.header.dataOffset} is not all ones (no further structure is defined)`);
    }
    const eof = this.fileSize - FOOTER_SIZE;
    if (!d.eofFooter) bad('footer', 'footer', eof, 'no footer at the end of the file (only the copy at offset 0, which QEMU uses)');
    else if (!d.eofFooter.checksumOk) bad('checksum', 'footer checksum', eof, `the footer at the end of the file (offset ${eof}) has a bad checksum`);
    else if (d.eofFooter.differs.length) bad('footer', 'footer', eof, `the footer at the end of the file differs from the copy at offset 0 in: ${d.eofFooter.differs.join(', ')}`);
    for (const l of d.locators) {
      if (!l.error) continue;
      (this.subformat === 'differencing' ? bad : warn)('locator', `parent locator ${l.index}`, l.code, `parent locator ${l.index} (${printable(l.code)}): ${l.error}`);
    }
    if (this.subformat === 'differencing' && d.parent && d.parent.uuidMatch !== true) {
      const what =
        d.parent.uuidMatch === false
          ? `${d.parent.candidate.path} exists but its UUID is not the parent UUID ${formatUuid(d.header.parentUuid)}`
          : `no candidate parent exists (tried ${d.parent.candidate.path} first)`;
      bad('parent', 'parent', d.parent.candidate.path, `parent: ${what}`);
    }
    const blocks = Math.ceil(this.virtualSize / d.blockSize);
    for (let k = blocks; k < d.entries; k++) {
      if (d.bat[k] !== BAT_UNUSED) warn('bat', `BAT entry ${k}`, d.bat[k], `BAT entry ${k} is allocated (sector ${d.bat[k]}) but lies beyond the virtual size`);
    }
  }

  /** Where everything lies, and what is wrong with it. Computed once from the BAT. */
  private layout(): Layout {
    if (this.layoutCache) return this.layoutCache;
    const d = this.dyn!;
    const structures: Structure[] = [
      { start: 0, length: FOOTER_SIZE, role: 'header', what: 'footer copy' },
      { start: d.headerOffset, length: DYN_HEADER_SIZE, role: 'header', what: 'dynamic header' },
      { start: d.tableOffset, length: Math.ceil((d.entries * 4) / VHD_SECTOR) * VHD_SECTOR, role: 'metadata', what: 'BAT' },
    ];
    for (const l of d.locators) {
      if (l.offset !== undefined && l.space) structures.push({ start: l.offset, length: l.space, role: 'metadata', what: `parent locator ${l.index} (${printable(l.code)})` });
    }
    if (d.eofFooter) structures.push({ start: this.fileSize - FOOTER_SIZE, length: FOOTER_SIZE, role: 'header', what: 'footer' });
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
      if (at(k) + span > this.fileSize) {
        fatal('block past end of file', `BAT entry ${k}`, d.bat[k], `${blockName(k)} runs past the end of the file (${this.fileSize} bytes); QEMU: "free_data_block_offset points after the end of file"`);
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
    return (this.layoutCache = { structures, order, problems });
  }
}

async function openDynamic(dev: BlockDevice, ctx: OpenContext, lf: LocatedFooter, fileSize: number, virtualSize: number, subformat: Subformat): Promise<DynamicState> {
  const headerOffset = safeU64(lf.footer.dataOffset, FORMAT, 'footer data_offset');
  requireInFile(FORMAT, 'footer data_offset (dynamic header)', headerOffset, DYN_HEADER_SIZE, fileSize);
  const raw = await readAt(dev, headerOffset, DYN_HEADER_SIZE);
  const header = decodeDynHeader(raw);
  if (header.cookie !== DYN_COOKIE) {
    throw new FormatError(FORMAT, 'dynamic header cookie', printable(header.cookie), `expected "cxsparse" at offset ${headerOffset} (QEMU: "Invalid header magic")`);
  }
  const blockSize = header.blockSize;
  if (!isPowerOfTwo(blockSize) || blockSize < VHD_SECTOR) {
    throw new FormatError(FORMAT, 'block_size', blockSize, 'must be a power of two of at least 512 (0 or other values divide by zero in readers: the CVE-2014-0142 family; QEMU: "Invalid block size")');
  }
  if (blockSize < 4096) {
    throw new UnsupportedError(
      FORMAT,
      'block size',
      `${blockSize} bytes: below 4 KiB the specification puts a 512-byte bitmap before each block and QEMU none, so the data's place is ambiguous`,
    );
  }
  const entries = header.maxTableEntries;
  if (entries * blockSize < virtualSize) {
    throw new FormatError(FORMAT, 'max_table_entries', entries, `× block size ${blockSize} covers less than the virtual size ${virtualSize} (QEMU: "Page table too small")`);
  }
  if (entries > QEMU_MAX_TABLE_ENTRIES) throw new FormatError(FORMAT, 'max_table_entries', entries, `above INT_MAX / 4 (QEMU: "Max Table Entries too large")`);
  const tableOffset = safeU64(header.tableOffset, FORMAT, 'table_offset');
  requireInFile(FORMAT, 'BAT (table_offset)', tableOffset, entries * 4, fileSize);
  if (entries * 4 > MAX_BAT_BYTES) {
    throw new UnsupportedError(FORMAT, 'BAT size', `${entries} entries (${entries * 4} bytes) exceed the ${MAX_BAT_BYTES}-byte table imgconv reads into memory`);
  }
  const batBytes = await readExact(dev, tableOffset, entries * 4, (got) => new FormatError(FORMAT, 'BAT (table_offset)', tableOffset, `file ended after ${got} bytes of the BAT`));
  const bat = new Uint32Array(entries);
  const dv = new DataView(batBytes.buffer, batBytes.byteOffset, batBytes.byteLength);
  for (let i = 0; i < entries; i++) bat[i] = dv.getUint32(i * 4, false);

  const state: DynamicState = {
    headerOffset,
    headerRaw: raw,
    header,
    headerChecksumOk: vhdChecksum(raw, DYN_CHECKSUM_OFFSET) === header.checksum,
    tableOffset,
    entries,
    blockSize,
    bitmapSize: qemuBitmapSize(blockSize),
    bat,
    locators: await readLocators(dev, header, fileSize),
  };

  if (fileSize >= 2 * FOOTER_SIZE) {
    const tail = await readAt(dev, fileSize - FOOTER_SIZE, FOOTER_SIZE);
    if (hasCookie(tail, FOOTER_COOKIE)) state.eofFooter = { buf: tail, checksumOk: footerChecksumOk(tail), differs: footerDifferences(lf.buf, tail) };
  }

  if (subformat === 'differencing') {
    const candidates = parentCandidates(state.locators, header.parentName);
    const choice = await chooseParent(candidates, header.parentUuid, ctx, async (p) => {
      const pf = await locateFooter(p, await p.size());
      return pf.footer.uuid;
    });
    if (!choice) {
      throw new FormatError(FORMAT, 'parent locators', state.locators.map((l) => printable(l.code)).join(',') || 'none', 'a differencing disk must name its parent, and this one has no usable W2ru/W2ku/MacX locator and an empty parent name');
    }
    state.parent = choice;
  }
  return state;
}

function buildInfo(lf: LocatedFooter, subformat: Subformat, virtualSize: number, d: DynamicState | undefined, fileSize: number): ImageInfo {
  const f = lf.footer;
  const g = f.geometry;
  const features: string[] = [];
  if (f.features & FEATURE_TEMPORARY) features.push('temporary disk');
  if (f.savedState) features.push('saved state');
  const details: ImageInfo['details'] = {
    'footer-location': lf.at === 0 ? 'offset 0 (copy; dynamic layout)' : `end of file (offset ${lf.at})`,
    'footer-checksum-ok': footerChecksumOk(lf.buf),
    features: `0x${f.features.toString(16).padStart(8, '0')}`,
    version: `${f.version >>> 16}.${f.version & 0xffff}`,
    'creator-app': printable(f.creatorApp),
    'creator-version': `${f.creatorVersion >>> 16}.${f.creatorVersion & 0xffff}`,
    'creator-os': printable(f.creatorOs),
    'original-size': u64Detail(f.originalSize),
    'current-size': u64Detail(f.currentSize),
    geometry: `${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`,
    'size-source': sizeSource(f.creatorApp, g),
    'disk-type': f.diskType,
    uuid: formatUuid(f.uuid),
    'saved-state': f.savedState !== 0,
    timestamp: vhdTimestampIso(f.timestamp),
  };
  const info: ImageInfo = { format: FORMAT, subformat, virtualSize, dirty: false, corrupt: false, features, details };
  if (!d) return info;
  info.clusterSize = d.blockSize;
  let allocated = 0;
  for (const e of d.bat) if (e !== BAT_UNUSED) allocated++;
  Object.assign(details, {
    'block-size': d.blockSize,
    'bitmap-size': d.bitmapSize,
    'max-table-entries': d.entries,
    'table-offset': d.tableOffset,
    'header-offset': d.headerOffset,
    'header-checksum-ok': d.headerChecksumOk,
    'allocated-blocks': allocated,
    'eof-footer': !d.eofFooter ? 'missing' : !d.eofFooter.checksumOk ? 'bad checksum' : d.eofFooter.differs.length ? `differs (${d.eofFooter.differs.join(', ')})` : 'matches copy',
    'file-length': fileSize,
  });
  if (subformat === 'differencing') {
    const h = d.header;
    Object.assign(details, {
      'parent-uuid': formatUuid(h.parentUuid),
      'parent-timestamp': vhdTimestampIso(h.parentTimestamp),
      'parent-name': h.parentName,
      'parent-locators': d.locators.map((l) => `${printable(l.code)}${l.stored !== undefined ? ` ${JSON.stringify(l.stored)}` : ''}${l.error ? ` (unusable: ${l.error})` : ''}`).join('; '),
      'parent-source': d.parent!.candidate.source,
      'parent-uuid-match': d.parent!.uuidMatch,
    });
    const backing: BackingRef = { filename: d.parent!.candidate.path, format: FORMAT };
    info.backing = backing;
    features.push('differencing (parent)');
  }
  return info;
}

export const vhdDriver: FormatDriver = {
  name: FORMAT,
  description: 'Microsoft VHD (Virtual PC / Hyper-V; QEMU "vpc"): fixed, dynamic, differencing',

  probe(input: ProbeInput): number {
    const { head, tail } = input;
    if (hasCookie(head, FOOTER_COOKIE)) {
      // A bad checksum still beats raw, so that opening explains what is wrong instead of the file
      // silently reading as raw (QEMU probes the cookie alone).
      return head.length >= FOOTER_SIZE && footerChecksumOk(head.subarray(0, FOOTER_SIZE)) ? 100 : 50;
    }
    if (tail.length === FOOTER_SIZE && hasCookie(tail, FOOTER_COOKIE) && footerChecksumOk(tail)) return 100;
    // A pre-2004 511-byte footer: claimed, so that opening refuses it clearly.
    const at511 = tail.length - (FOOTER_SIZE - 1);
    if (at511 >= 0 && hasCookie(tail, FOOTER_COOKIE, at511) && footerChecksumOk(tail.subarray(at511))) return 100;
    return 0;
  },

  async open(dev: BlockDevice, ctx: OpenContext): Promise<SourceImage> {
    const fileSize = await dev.size();
    const lf = await locateFooter(dev, fileSize);
    if (!footerChecksumOk(lf.buf)) {
      const computed = vhdChecksum(lf.buf, FOOTER_CHECKSUM_OFFSET);
      throw new FormatError(FORMAT, 'footer checksum', lf.footer.checksum, `the footer at offset ${lf.at} sums to 0x${computed.toString(16)} (QEMU: "Incorrect header checksum")`);
    }
    const subformat = subformatOf(lf);
    const sectors = virtualSectors(lf.footer.creatorApp, lf.footer.geometry, lf.footer.currentSize);
    if (sectors > BigInt(VHD_MAX_SECTORS)) {
      const g = lf.footer.geometry;
      throw new FormatError(FORMAT, sizeSource(lf.footer.creatorApp, g) === 'chs' ? 'geometry' : 'current_size', `${sectors * 512n} bytes`, 'above the 2040 GiB VHD maximum (QEMU: EFBIG)');
    }
    const virtualSize = Number(sectors) * VHD_SECTOR;
    let dyn: DynamicState | undefined;
    if (subformat === 'fixed') {
      if (virtualSize > lf.at) {
        throw new FormatError(FORMAT, 'virtual size', virtualSize, `larger than the ${lf.at} bytes of data before the footer (QEMU would read the footer as guest data)`);
      }
    } else {
      dyn = await openDynamic(dev, ctx, lf, fileSize, virtualSize, subformat);
    }
    return new VhdImage(dev, buildInfo(lf, subformat, virtualSize, dyn, fileSize), fileSize, subformat, lf, dyn);
  },
};
