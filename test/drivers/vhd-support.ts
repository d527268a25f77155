/**
 * Helpers for the VHD tests: opening through NoWriteDevice, qemu-img comparisons, and a small
 * builder of dynamic/differencing/fixed VHDs from the driver's own encoders.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { FileBlockDevice } from '../../src/blockdev/file.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import type { DeviceOpener } from '../../src/blockdev/types.js';
import { openImage, type ImageChain } from '../../src/image.js';
import type { OpenContext } from '../../src/driver.js';
import { rawDriver } from '../../drivers/raw/index.js';
import {
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  FEATURE_RESERVED,
  VHD_VERSION,
  bitmapSet,
  encodeDynHeader,
  encodeFooter,
  geometryForSize,
  qemuBitmapSize,
  vhdDriver,
  type Geometry,
} from '../../drivers/vhd/index.js';
import { NoWriteDevice } from '../support/devices.js';
import { qemuImg } from '../support/qemu.js';

export const fileOpener: DeviceOpener = async (p, o) => new NoWriteDevice(await FileBlockDevice.open(p, { ...o, write: false }));

export async function openVhd(path: string, opts: { format?: string; opener?: DeviceOpener } = {}): Promise<ImageChain> {
  return openImage(path, { drivers: [vhdDriver, rawDriver], ...(opts.format ? { format: opts.format } : {}), opener: opts.opener ?? fileOpener });
}

/** Opens one in-memory VHD with the driver (no chain), through NoWriteDevice. */
export async function openMem(bytes: Uint8Array, ctx?: Partial<OpenContext>) {
  const dev = new NoWriteDevice(MemoryBlockDevice.from(bytes, '/mem/image.vhd'));
  return vhdDriver.open(dev, {
    path: '/mem/image.vhd',
    openRelated: async (name) => {
      throw new Error(`no related file ${name}`);
    },
    ...ctx,
  });
}

export function qemuJson(args: string[]): unknown {
  return JSON.parse(qemuImg(args));
}

export function qemuRawSha(path: string, out: string): string {
  qemuImg(['convert', '-f', 'vpc', '-O', 'raw', path, out]);
  return createHash('sha256').update(readFileSync(out)).digest('hex');
}

export const UUID_A = Uint8Array.from({ length: 16 }, (_, i) => 0xa0 + i);
export const UUID_B = Uint8Array.from({ length: 16 }, (_, i) => 0xb0 + i);

export interface FooterOpts {
  diskType: number;
  currentSize: number;
  geometry?: Geometry;
  creatorApp?: string;
  dataOffset?: bigint;
  uuid?: Uint8Array;
  savedState?: number;
  features?: number;
  checksum?: number;
}

export function footer(o: FooterOpts): Uint8Array {
  return encodeFooter({
    features: o.features ?? FEATURE_RESERVED,
    version: VHD_VERSION,
    dataOffset: o.dataOffset ?? (o.diskType === DISK_FIXED ? 0xffffffffffffffffn : 512n),
    timestamp: 0x2e000000,
    creatorApp: o.creatorApp ?? 'qemu',
    creatorVersion: 0x00050003,
    creatorOs: 'Wi2k',
    originalSize: BigInt(o.currentSize),
    currentSize: BigInt(o.currentSize),
    geometry: o.geometry ?? geometryForSize(o.currentSize),
    diskType: o.diskType,
    uuid: o.uuid ?? UUID_A,
    savedState: o.savedState ?? 0,
    ...(o.checksum !== undefined ? { checksum: o.checksum } : {}),
  });
}

export interface BlockSpec {
  /** Sectors marked present (all when omitted). */
  present?: number[];
  /** Fills the block's data area (its whole length). */
  data: Uint8Array | number;
}

export interface LocatorSpec {
  code: string;
  bytes: Uint8Array;
  /** Stored data space; sectors by default. */
  dataSpace?: number;
}

export interface BuildOpts {
  virtualSize: number;
  /** Defaults to a CHS-exact geometry via creator "qem2" (virtual size = current size). */
  creatorApp?: string;
  geometry?: Geometry;
  blockSize?: number;
  diskType?: number;
  blocks?: Map<number, BlockSpec>;
  /** Extra BAT entries beyond the virtual size. */
  maxTableEntries?: number;
  parentUuid?: Uint8Array;
  parentName?: string;
  locators?: LocatorSpec[];
  uuid?: Uint8Array;
  /** Leave out the footer at the end of the file. */
  noEofFooter?: boolean;
  /** Block indices in the order their blocks are placed in the file (default: index order). */
  hostOrder?: number[];
}

export interface Built {
  bytes: Uint8Array;
  tableOffset: number;
  bat: number[];
  blockSize: number;
  bitmapSize: number;
  firstBlockSector: number;
}

/**
 * A dynamic or differencing VHD laid out like QEMU's (footer copy, header at 512, locator data,
 * BAT, blocks in index order, footer), blocks with their bitmaps.
 */
export function buildDynamic(o: BuildOpts): Built {
  const blockSize = o.blockSize ?? 2 * 1024 * 1024;
  const bitmapSize = qemuBitmapSize(blockSize);
  const entries = o.maxTableEntries ?? Math.ceil(o.virtualSize / blockSize);
  const ftr = footer({
    diskType: o.diskType ?? DISK_DYNAMIC,
    currentSize: o.virtualSize,
    creatorApp: o.creatorApp ?? 'qem2',
    geometry: o.geometry ?? { cylinders: 65535, heads: 16, sectorsPerTrack: 255 },
    ...(o.uuid ? { uuid: o.uuid } : {}),
  });
  let pos = 1536;
  const locs = (o.locators ?? []).map((l) => {
    const space = Math.ceil(l.bytes.length / 512) || 1;
    const at = pos;
    pos += space * 512;
    return { code: l.code, dataSpace: l.dataSpace ?? space, dataLength: l.bytes.length, dataOffset: at, bytes: l.bytes };
  });
  const tableOffset = pos;
  pos += Math.ceil((entries * 4) / 512) * 512;
  const bat: number[] = new Array(entries).fill(0xffffffff);
  const blockAt = new Map<number, number>();
  for (const k of o.hostOrder ?? [...(o.blocks?.keys() ?? [])].sort((a, b) => a - b)) {
    bat[k] = pos / 512;
    blockAt.set(k, pos);
    pos += bitmapSize + blockSize;
  }
  const total = pos + (o.noEofFooter ? 0 : 512);
  const out = new Uint8Array(total);
  out.set(ftr, 0);
  out.set(
    encodeDynHeader({
      tableOffset,
      maxTableEntries: entries,
      blockSize,
      ...(o.parentUuid ? { parentUuid: o.parentUuid } : {}),
      ...(o.parentName ? { parentName: o.parentName } : {}),
      locators: locs,
    }),
    512,
  );
  for (const l of locs) out.set(l.bytes, l.dataOffset);
  const dv = new DataView(out.buffer);
  bat.forEach((e, i) => dv.setUint32(tableOffset + i * 4, e, false));
  for (const [k, at] of blockAt) {
    const spec = o.blocks!.get(k)!;
    const bitmap = new Uint8Array(bitmapSize);
    if (spec.present) for (const s of spec.present) bitmapSet(bitmap, s);
    else bitmap.fill(0xff);
    out.set(bitmap, at);
    if (typeof spec.data === 'number') out.fill(spec.data, at + bitmapSize, at + bitmapSize + blockSize);
    else out.set(spec.data, at + bitmapSize);
  }
  if (!o.noEofFooter) out.set(ftr, pos);
  return { bytes: out, tableOffset, bat, blockSize, bitmapSize, firstBlockSector: (tableOffset + Math.ceil((entries * 4) / 512) * 512) / 512 };
}

/** A fixed VHD: `dataBytes` of zeros (or the given data) followed by the footer. */
export function buildFixed(dataBytes: number, f: Omit<FooterOpts, 'diskType'>, data?: Uint8Array): Uint8Array {
  const out = new Uint8Array(dataBytes + 512);
  if (data) out.set(data.subarray(0, dataBytes));
  out.set(footer({ ...f, diskType: DISK_FIXED }), dataBytes);
  return out;
}

export { DISK_DIFFERENCING, DISK_DYNAMIC, DISK_FIXED };
