/**
 * Mapping helpers of the engine: guest-content equivalence of two mappings, and reading guest bytes
 * of one layer (for data that must be copied).
 */
import type { BlockDevice } from '../blockdev/types.js';
import { isAllZero } from '../blockdev/sparse.js';
import type { SourceImage } from '../driver.js';
import type { ExtentMap } from '../extent-map.js';

type Reads = { what: 'data'; host: number } | { what: 'zeros' } | { what: 'backing' } | { what: 'compressed'; host: number };

function reads(kind: string, host: number | undefined, hasBacking: boolean): Reads {
  if (kind === 'data') return { what: 'data', host: host! };
  if (kind === 'compressed') return { what: 'compressed', host: host! };
  if (kind === 'unallocated' && hasBacking) return { what: 'backing' };
  return { what: 'zeros' };
}

/**
 * Null when both mappings read the same guest content: the same data at the same host offsets, zeros
 * where zeros (an explicit zero run and an unallocated run without backing both read zeros), the backing
 * file where the backing file. Otherwise a description of the first difference.
 */
export function guestEquivalent(expected: ExtentMap, actual: ExtentMap, hasBacking: boolean): string | null {
  if (expected.virtualSize !== actual.virtualSize) return `virtual size ${actual.virtualSize} ≠ ${expected.virtualSize}`;
  let i = 0;
  let j = 0;
  let pos = 0;
  while (pos < expected.virtualSize) {
    const a = expected.at(i);
    const b = actual.at(j);
    const end = Math.min(a.guest + a.length, b.guest + b.length);
    const ra = reads(a.kind, a.host === undefined ? undefined : a.host + (pos - a.guest), hasBacking);
    const rb = reads(b.kind, b.host === undefined ? undefined : b.host + (pos - b.guest), hasBacking);
    const same = ra.what === rb.what && (!('host' in ra) || ('host' in rb && ra.host === rb.host));
    if (!same) {
      return `guest ${pos}..${end}: expected ${ra.what}${'host' in ra ? '@' + ra.host : ''}, found ${rb.what}${'host' in rb ? '@' + rb.host : ''}`;
    }
    pos = end;
    if (pos >= a.guest + a.length) i++;
    if (pos >= b.guest + b.length) j++;
  }
  return null;
}

/** Guest bytes of one layer (unallocated reads as zeros; callers refuse moves over a backing file). */
export async function readTopLayer(img: SourceImage, map: ExtentMap, guest: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  for (const e of map.range(guest, length)) {
    const dst = out.subarray(e.guest - guest, e.guest - guest + e.length);
    if (e.kind === 'data') {
      let done = 0;
      while (done < dst.length) {
        const n = await img.dataDev.read(dst.subarray(done), e.host! + done);
        if (n === 0) break;
        done += n;
      }
    } else if (e.kind === 'compressed') {
      if (!img.readCompressed) throw new Error(`${img.format}: cannot decode compressed data`);
      const bytes = await img.readCompressed({ guest: e.guest - e.within, length: 0, kind: 'compressed', host: e.host!, hostLength: e.hostLength! });
      dst.set(bytes.subarray(e.within, e.within + e.length));
    }
  }
  return out;
}

/**
 * guestEquivalent for identity targets (raw, VHD fixed), whose readers describe holes as zero runs at
 * their own offset: a hole at host = guest reads the same bytes as data there, and where zeros are
 * expected, data at its own offset is accepted once its bytes are read and found zero (the commit wrote
 * zeros there, or punching fell back to writing zeros).
 */
export async function identityEquivalent(expected: ExtentMap, actual: ExtentMap, dev: BlockDevice): Promise<string | null> {
  if (expected.virtualSize !== actual.virtualSize) return `virtual size ${actual.virtualSize} ≠ ${expected.virtualSize}`;
  let i = 0;
  let j = 0;
  let pos = 0;
  while (pos < expected.virtualSize) {
    const a = expected.at(i);
    const b = actual.at(j);
    const end = Math.min(a.guest + a.length, b.guest + b.length);
    const atSelf = b.host !== undefined && b.host + (pos - b.guest) === pos;
    const bReadsData = b.kind === 'data' || b.kind === 'compressed';
    const wantData = a.kind === 'data';
    if (wantData) {
      if (a.host! + (pos - a.guest) !== pos) return `guest ${pos}: the expected identity mapping has data at ${a.host! + (pos - a.guest)}`;
      if (!atSelf || b.kind === 'compressed' || b.kind === 'unallocated') return `guest ${pos}..${end}: expected data@${pos}, found ${b.kind}${b.host !== undefined ? '@' + (b.host + (pos - b.guest)) : ''}`;
    } else if (bReadsData) {
      if (!atSelf || b.kind !== 'data') return `guest ${pos}..${end}: expected zeros, found ${b.kind}@${b.host! + (pos - b.guest)}`;
      const nonZero = await firstNonZero(dev, pos, end - pos);
      if (nonZero !== null) return `guest ${nonZero}: expected zeros, found non-zero data`;
    }
    pos = end;
    if (pos >= a.guest + a.length) i++;
    if (pos >= b.guest + b.length) j++;
  }
  return null;
}

async function firstNonZero(dev: BlockDevice, start: number, length: number): Promise<number | null> {
  const chunk = new Uint8Array(Math.min(length, 1 << 20));
  for (let off = 0; off < length; off += chunk.length) {
    const n = Math.min(chunk.length, length - off);
    const view = chunk.subarray(0, n);
    view.fill(0);
    let got = 0;
    while (got < n) {
      const r = await dev.read(view.subarray(got), start + off + got);
      if (r === 0) break;
      got += r;
    }
    // memcmp against zeros first; the byte scan only runs on the chunk that has data.
    if (!isAllZero(view)) return start + off + view.findIndex((x) => x !== 0);
  }
  return null;
}
