/**
 * Helpers for the qcow2 tests: opening through NoWriteDevice, qemu-img map/check/convert
 * comparisons, and small in-memory images built with qemu-img for hostile-input tests.
 */
import { normaliseMap as sharedNormalise, type RawMapEntry } from '../support/qemu-map.js';
import { createHash } from 'node:crypto';
import { deflateRawSync } from 'node:zlib';
import { encodeL1Entry, encodeL2Entry, encodeReftableEntry, getRefcount, setRefcount } from '../../drivers/qcow2/entries.js';
import { EXT_FEATURE_TABLE, encodeExtensions, encodeFeatureTable } from '../../drivers/qcow2/extensions.js';
import { encodeHeader, type Qcow2Header } from '../../drivers/qcow2/header.js';
import { readFileSync } from 'node:fs';
import { FileBlockDevice } from '../../src/blockdev/file.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import type { CheckReport, OpenContext, SourceImage } from '../../src/driver.js';
import { GuestReader } from '../../src/guest.js';
import { openImage, type ImageChain } from '../../src/image.js';
import { mapChain, type MapEntry } from '../../src/map.js';
import { qcow2Driver } from '../../drivers/qcow2/index.js';
import { rawDriver } from '../../drivers/raw/index.js';
import { NoWriteDevice } from '../support/devices.js';
import { execFileSync, spawnSync } from 'node:child_process';
import { dirname } from 'node:path';

/**
 * qemu-img / qemu-io run in the image's directory: QEMU 7.2 opens an external data file's relative
 * name relative to its working directory (imgconv, like QEMU for backing files, uses the image's).
 */
export function qemuImg(args: string[], cwd?: string): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...(cwd ? { cwd } : {}) });
}

export function qemuIoIn(file: string, cmds: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of cmds) args.push('-c', c);
  execFileSync('qemu-io', [...args, file], { stdio: ['ignore', 'ignore', 'pipe'], cwd: dirname(file) });
}

export async function openQcow2Chain(path: string): Promise<ImageChain> {
  return openImage(path, {
    drivers: [qcow2Driver, rawDriver],
    opener: async (p, o) => new NoWriteDevice(await FileBlockDevice.open(p, { ...o, write: false })),
  });
}

/** The shared normalisation (test/support/qemu-map.ts): what qemu-img map comparisons ignore and merge. */
export function normaliseMap(entries: readonly MapEntry[] | readonly Record<string, unknown>[]) {
  return sharedNormalise(entries as unknown as RawMapEntry[]);
}

export function qemuMap(path: string): Record<string, unknown>[] {
  return JSON.parse(qemuImg(['map', '--output=json', path], dirname(path))) as Record<string, unknown>[];
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(qemuImg(['info', '--output=json', path], dirname(path))) as Record<string, unknown>;
}

export interface QemuCheck {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** qemu-img check --output=json (exit 2/3 still print JSON); absent counters are 0. */
export function qemuCheck(path: string): QemuCheck {
  return qemuCheckFull(path).counts;
}

/** The counters and the problem lines qemu-img check prints (ERROR ..., Leaked cluster ...). */
export function qemuCheckFull(path: string): { counts: QemuCheck; lines: string[] } {
  const r = spawnSync('qemu-img', ['check', '--output=json', path], { encoding: 'utf8', cwd: dirname(path) });
  const j = JSON.parse(r.stdout) as Record<string, number>;
  // QEMU's bitmap warning ends without a newline, so a problem line may follow text on the same line.
  const lines = r.stderr.match(/(ERROR|Leaked cluster|Can't get refcount)[^\n]*/g) ?? [];
  return { lines, counts: {
    corruptions: j['corruptions'] ?? 0,
    leaks: j['leaks'] ?? 0,
    checkErrors: j['check-errors'] ?? 0,
    imageEndOffset: j['image-end-offset'],
    totalClusters: j['total-clusters'],
    allocatedClusters: j['allocated-clusters'] ?? 0,
    fragmentedClusters: j['fragmented-clusters'] ?? 0,
    compressedClusters: j['compressed-clusters'] ?? 0,
  } };
}

export function ourCheckShape(r: CheckReport): QemuCheck {
  return {
    corruptions: r.corruptions,
    leaks: r.leaks,
    checkErrors: r.checkErrors,
    imageEndOffset: r.imageEndOffset,
    totalClusters: r.totalClusters,
    allocatedClusters: r.allocatedClusters ?? 0,
    fragmentedClusters: r.fragmentedClusters ?? 0,
    compressedClusters: r.compressedClusters ?? 0,
  };
}

export function qemuRawSha(path: string, tmp: string): string {
  qemuImg(['convert', '-O', 'raw', path, tmp], dirname(path));
  return createHash('sha256').update(readFileSync(tmp)).digest('hex');
}

export async function ourMap(chain: ImageChain): Promise<MapEntry[]> {
  return mapChain(chain);
}

export async function ourSha(chain: ImageChain): Promise<string> {
  return (await GuestReader.create(chain)).sha256();
}

/** An in-memory, write-refusing device over a copy of `bytes`. */
export function memDevice(bytes: Uint8Array, path = '/mem/image.qcow2'): NoWriteDevice {
  return new NoWriteDevice(MemoryBlockDevice.from(bytes.slice(), path));
}

export const noRelated: OpenContext = {
  path: '/mem/image.qcow2',
  openRelated: async (name) => {
    throw new Error(`no related files here (${name})`);
  },
};

export function openBytes(bytes: Uint8Array, ctx: OpenContext = noRelated): Promise<SourceImage> {
  return qcow2Driver.open(memDevice(bytes), ctx);
}

export function fileBytes(path: string): Uint8Array {
  return new Uint8Array(readFileSync(path));
}

export function setU32(b: Uint8Array, off: number, v: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(off, v >>> 0);
}

export function setU64(b: Uint8Array, off: number, v: bigint | number): void {
  new DataView(b.buffer, b.byteOffset).setBigUint64(off, BigInt(v));
}

export function getU64(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset).getBigUint64(off);
}

export function getU32(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset).getUint32(off);
}

/**
 * A small valid v3 image built with the driver's own encoders: 4 KiB clusters, 1 MiB disk.
 * Clusters: 0 header (+ a feature-name table extension), 1 reftable, 2 refblock, 3 L1, 4 L2,
 * 5 data (guest cluster 0, 0x11), 6 data (guest cluster 2, 0x22), 7 compressed (guest cluster 4,
 * 0x77), 8 preallocated zero (guest cluster 5); guest cluster 3 is a plain zero cluster.
 */
export const BUILT = { cs: 4096, size: 1 << 20, reftable: 4096, refblock: 8192, l1: 12288, l2: 16384, clusters: 9 } as const;

export function buildImage(): Uint8Array {
  const { cs, size } = BUILT;
  const b = new Uint8Array(BUILT.clusters * cs);
  const header: Qcow2Header = {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 12, size, cryptMethod: 0,
    l1Size: 1, l1TableOffset: BUILT.l1, refcountTableOffset: BUILT.reftable, refcountTableClusters: 1,
    nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n,
    refcountOrder: 4, headerLength: 112, compressionType: 0,
  };
  b.set(encodeHeader(header), 0);
  b.set(encodeExtensions([{ type: EXT_FEATURE_TABLE, data: encodeFeatureTable([{ type: 0, bit: 0, name: 'dirty bit' }]) }]), 112);
  const put = (off: number, [hi, lo]: [number, number]) => {
    setU32(b, off, hi);
    setU32(b, off + 4, lo);
  };
  put(BUILT.reftable, encodeReftableEntry({ offset: BUILT.refblock, reserved: 0 }));
  for (let k = 0; k < BUILT.clusters; k++) setRefcount(b.subarray(BUILT.refblock, BUILT.refblock + cs), k, 4, 1);
  put(BUILT.l1, encodeL1Entry({ l2Offset: BUILT.l2, copied: true, reserved: 0n }));
  const std = (offset: number, zero = false) => encodeL2Entry({ compressed: false, copied: offset !== 0, offset, zero, reserved: 0n }, 12);
  put(BUILT.l2 + 0 * 8, std(5 * cs));
  b.fill(0x11, 5 * cs, 6 * cs);
  put(BUILT.l2 + 2 * 8, std(6 * cs));
  b.fill(0x22, 6 * cs, 7 * cs);
  put(BUILT.l2 + 3 * 8, std(0, true));
  const payload = deflateRawSync(Buffer.alloc(cs, 0x77));
  b.set(payload, 7 * cs);
  put(BUILT.l2 + 4 * 8, encodeL2Entry({ compressed: true, copied: false, hostOffset: 7 * cs, extraSectors: Math.ceil(payload.length / 512) - 1 }, 12));
  put(BUILT.l2 + 5 * 8, std(8 * cs, true));
  return b;
}

/** The guest content of buildImage(). */
export function builtGuest(): Uint8Array {
  const g = new Uint8Array(BUILT.size);
  g.fill(0x11, 0, 4096);
  g.fill(0x22, 8192, 12288);
  g.fill(0x77, 16384, 20480);
  return g;
}

/** Stored refcount of every cluster below the file end, read straight from the refcount structures. */
export function storedRefcounts(b: Uint8Array): number[] {
  const cs = 2 ** getU32(b, 20);
  const order = getU32(b, 4) >= 3 ? getU32(b, 96) : 4;
  const perBlock = (cs * 8) / (1 << order);
  const reftable = Number(getU64(b, 48));
  const clusters = Math.ceil(b.length / cs);
  const out: number[] = [];
  for (let k = 0; k < clusters; k++) {
    const block = Number(getU64(b, reftable + 8 * Math.floor(k / perBlock)) & ~0x1ffn);
    out.push(block ? getRefcount(b.subarray(block, block + cs), k % perBlock, order) : 0);
  }
  return out;
}
