/**
 * Helpers for the VMDK tests: opening through NoWriteDevice, comparing with qemu-img map/convert.
 */
import { normaliseMap as sharedNormalise, type RawMapEntry } from '../support/qemu-map.js';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { FileBlockDevice } from '../../src/blockdev/file.js';
import { openImage, type ImageChain } from '../../src/image.js';
import { mapChain, type MapEntry } from '../../src/map.js';
import { GuestReader } from '../../src/guest.js';
import { vmdkDriver } from '../../drivers/vmdk/index.js';
import { rawDriver } from '../../drivers/raw/index.js';
import { NoWriteDevice } from '../support/devices.js';
import { qemuImg } from '../support/qemu.js';

export async function openVmdk(path: string, format?: string): Promise<ImageChain> {
  return openImage(path, {
    drivers: [vmdkDriver, rawDriver],
    ...(format ? { format } : {}),
    opener: async (p, o) => new NoWriteDevice(await FileBlockDevice.open(p, { ...o, write: false })),
  });
}

/** The shared normalisation (test/support/qemu-map.ts): what qemu-img map comparisons ignore and merge. */
export function normaliseMap(entries: readonly MapEntry[] | readonly Record<string, unknown>[]) {
  return sharedNormalise(entries as unknown as RawMapEntry[]);
}

export function qemuMap(path: string): Record<string, unknown>[] {
  return JSON.parse(qemuImg(['map', '--output=json', path])) as Record<string, unknown>[];
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(qemuImg(['info', '--output=json', path])) as Record<string, unknown>;
}

export function qemuRawSha(path: string, tmp: string): string {
  qemuImg(['convert', '-O', 'raw', path, tmp]);
  return createHash('sha256').update(readFileSync(tmp)).digest('hex');
}

export async function ourMap(chain: ImageChain): Promise<MapEntry[]> {
  return mapChain(chain);
}

export async function ourSha(chain: ImageChain): Promise<string> {
  return (await GuestReader.create(chain)).sha256();
}
