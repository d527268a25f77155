/**
 * Helpers for the VMDK tests: opening through NoWriteDevice, comparing with qemu-img map/convert.
 */
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

interface Norm {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  data: boolean;
  zero: boolean;
  offset?: number;
}

/**
 * Merges adjacent runs with equal depth/present/data/zero and continuing offsets; drops filename,
 * compressed, and the zero flag of data runs. `holesAsZero` turns data runs over file holes
 * (QEMU's flat extents) into zero runs with their offset, as imgconv reports them.
 */
export function normaliseMap(entries: MapEntry[] | Record<string, unknown>[], holesAsZero = false): Norm[] {
  const out: Norm[] = [];
  for (const raw of entries as Record<string, unknown>[]) {
    let data = raw.data as boolean;
    let zero = raw.zero as boolean;
    if (holesAsZero && data && zero) data = false;
    if (data) zero = false;
    const e: Norm = { start: raw.start as number, length: raw.length as number, depth: raw.depth as number, present: raw.present as boolean, data, zero };
    if (raw.offset !== undefined) e.offset = raw.offset as number;
    const p = out[out.length - 1];
    if (
      p &&
      p.start + p.length === e.start &&
      p.depth === e.depth &&
      p.present === e.present &&
      p.data === e.data &&
      p.zero === e.zero &&
      ((p.offset === undefined && e.offset === undefined) || (p.offset !== undefined && e.offset !== undefined && p.offset + p.length === e.offset))
    ) {
      p.length += e.length;
    } else {
      out.push(e);
    }
  }
  return out;
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
