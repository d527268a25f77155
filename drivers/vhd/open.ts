/**
 * Opening a VHD: finding the footer QEMU's way, the subformat, the dynamic header and the BAT, with
 * every bound checked before anything is allocated.
 */
import { isPowerOfTwo, requireInFile, safeU64 } from '../../src/binary.js';
import { readAt, readExact, type BlockDevice } from '../../src/blockdev/types.js';
import type { OpenContext } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import {
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_CHECKSUM_OFFSET,
  DYN_COOKIE,
  DYN_HEADER_SIZE,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  FORMAT,
  decodeDynHeader,
  decodeFooter,
  footerChecksumOk,
  hasCookie,
  printable,
  qemuBitmapSize,
  vhdChecksum,
  type DynHeader,
  type VhdFooter,
} from './format.js';
import { VHD_SECTOR } from './geometry.js';
import { chooseParent, parentCandidates, readLocators, type LocatorInfo, type ParentChoice } from './parent.js';

/** The BAT is read whole; beyond this (64 Mi entries: 128 TiB of 2 MiB blocks) imgconv refuses. */
export const MAX_BAT_BYTES = 256 * 1024 * 1024;
/** QEMU refuses max_table_entries above INT_MAX / 4. */
const QEMU_MAX_TABLE_ENTRIES = Math.floor(0x7fffffff / 4);

export type Subformat = 'fixed' | 'dynamic' | 'differencing';

/** Where the footer in use was found and what it says. */
export interface LocatedFooter {
  buf: Uint8Array;
  at: number;
  footer: VhdFooter;
}

/**
 * QEMU's rule: "conectix" at offset 0 is the footer copy of a dynamic/differencing disk; otherwise the
 * last 512 bytes. A footer only in the last 511 bytes is a pre-2004 Virtual PC file, refused (QEMU
 * refuses it too, "invalid VPC image").
 */
export async function locateFooter(dev: BlockDevice, fileSize: number): Promise<LocatedFooter> {
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

export function subformatOf(lf: LocatedFooter): Subformat {
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

export interface DynamicState {
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

export async function openDynamic(dev: BlockDevice, ctx: OpenContext, lf: LocatedFooter, fileSize: number, virtualSize: number, subformat: Subformat): Promise<DynamicState> {
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
