/**
 * File holes under zero runs. A run that reads as zeros and whose host bytes are a hole in the file
 * (a raw disk's sparse regions) can be mapped as data in place: it reads zeros, stays sparse, and —
 * unlike an explicit zero cluster — leaves no host space unreferenced, which QED's checker would
 * count as leaked. Both the conversion and recovery derive the source mapping through here, so they
 * expect the same thing.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { ExtentMap } from '../extent-map.js';
import type { FreeRange } from '../host-space.js';

/** The holes of a device, from SEEK_DATA/SEEK_HOLE (none where the filesystem cannot tell). */
export async function scanHoles(dev: BlockDevice): Promise<FreeRange[]> {
  const size = await dev.size();
  const out: FreeRange[] = [];
  let pos = 0;
  while (pos < size) {
    const data = await dev.nextData(pos);
    const end = data === null ? size : data;
    if (end > pos) out.push({ start: pos, length: end - pos });
    if (data === null) break;
    pos = await dev.nextHole(data);
  }
  return out;
}

/** Zero runs with a host offset whose host bytes lie in holes become data runs at the same place. */
export function holesAsData(map: ExtentMap, holes: FreeRange[]): ExtentMap {
  if (holes.length === 0) return map;
  const out = new ExtentMap(map.virtualSize);
  let h = 0;
  for (const e of map) {
    if (e.kind !== 'zero' || e.host === undefined) {
      out.push(e);
      continue;
    }
    // Walk the holes overlapping [host, host+length): covered parts become data.
    let pos = 0;
    while (h > 0 && holes[h - 1]!.start + holes[h - 1]!.length > e.host) h--;
    while (h < holes.length && holes[h]!.start + holes[h]!.length <= e.host) h++;
    let k = h;
    while (pos < e.length) {
      const hostPos = e.host + pos;
      const hole = holes[k];
      if (!hole || hole.start >= e.host + e.length) {
        out.push({ guest: e.guest + pos, length: e.length - pos, kind: 'zero', host: hostPos });
        break;
      }
      if (hole.start > hostPos) {
        const len = hole.start - hostPos;
        out.push({ guest: e.guest + pos, length: len, kind: 'zero', host: hostPos });
        pos += len;
        continue;
      }
      const len = Math.min(hole.start + hole.length, e.host + e.length) - hostPos;
      if (len > 0) {
        out.push({ guest: e.guest + pos, length: len, kind: 'data', host: hostPos });
        pos += len;
      }
      k++;
    }
  }
  return out;
}
