/**
 * Mapping helpers of the engine: guest-content equivalence of two mappings, and reading guest bytes
 * of one layer (for data that must be copied).
 */
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
