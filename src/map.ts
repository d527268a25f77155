/**
 * `imgconv map`: the guest mapping of a whole chain in the shape of `qemu-img map --output=json`
 * (start, length, depth, present, zero, data, compressed, offset), adjacent equal runs merged.
 * As in QEMU, a data run whose host bytes are a hole in the file is reported `zero: true`.
 */
import type { ImageChain } from './image.js';
import type { SourceImage } from './driver.js';
import type { ExtentMap } from './extent-map.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed: boolean;
  offset?: number;
  filename?: string;
}

export async function mapChain(chain: ImageChain): Promise<MapEntry[]> {
  const maps: ExtentMap[] = [];
  for (const l of chain.layers) maps.push(await l.mapping());
  const out: MapEntry[] = [];
  const emit = (e: MapEntry) => {
    const p = out[out.length - 1];
    if (
      p &&
      p.start + p.length === e.start &&
      p.depth === e.depth &&
      p.present === e.present &&
      p.zero === e.zero &&
      p.data === e.data &&
      p.compressed === e.compressed &&
      p.filename === e.filename &&
      ((p.offset === undefined && e.offset === undefined) ||
        (p.offset !== undefined && e.offset !== undefined && p.offset + p.length === e.offset))
    ) {
      p.length += e.length;
    } else {
      out.push(e);
    }
  };
  const walk = async (depth: number, start: number, length: number): Promise<void> => {
    const map = maps[depth]!;
    const layer = chain.layers[depth]!;
    const inside = Math.max(0, Math.min(length, map.virtualSize - start));
    for (const e of map.range(start, inside)) {
      const filename = layer.dataFile;
      switch (e.kind) {
        case 'data':
          for (const piece of await splitHoles(layer, e.host!, e.length)) {
            emit({ start: e.guest + piece.at, length: piece.length, depth, present: true, zero: piece.hole, data: true, compressed: false, offset: e.host! + piece.at, ...(filename ? { filename } : {}) });
          }
          break;
        case 'zero':
          emit({ start: e.guest, length: e.length, depth, present: true, zero: true, data: false, compressed: false, ...(e.host !== undefined ? { offset: e.host } : {}), ...(filename && e.host !== undefined ? { filename } : {}) });
          break;
        case 'compressed':
          emit({ start: e.guest, length: e.length, depth, present: true, zero: false, data: true, compressed: true });
          break;
        case 'unallocated':
          if (depth + 1 < maps.length) await walk(depth + 1, e.guest, e.length);
          // An unallocated run may still have a place reserved for it (qcow2 extended L2 subclusters).
          else emit({ start: e.guest, length: e.length, depth, present: false, zero: true, data: false, compressed: false, ...(e.host !== undefined ? { offset: e.host } : {}) });
          break;
      }
    }
    if (inside < length) {
      // Beyond a shorter backing file's end: zeros, reported (as qemu-img does) at the depth of the
      // layer above, whose unallocated range it is.
      emit({ start: start + inside, length: length - inside, depth: Math.max(0, depth - 1), present: false, zero: true, data: false, compressed: false });
    }
  };
  await walk(0, 0, maps[0]!.virtualSize);
  return out;
}

/** Splits a host range into pieces that are file holes or not (SEEK_DATA/SEEK_HOLE). */
async function splitHoles(layer: SourceImage, host: number, length: number): Promise<{ at: number; length: number; hole: boolean }[]> {
  const dev = layer.dataDev;
  const out: { at: number; length: number; hole: boolean }[] = [];
  const end = host + length;
  const size = await dev.size();
  let pos = host;
  while (pos < end) {
    if (pos >= size) {
      out.push({ at: pos - host, length: end - pos, hole: true });
      break;
    }
    const data = await dev.nextData(pos);
    if (data === null || data >= end) {
      out.push({ at: pos - host, length: end - pos, hole: true });
      break;
    }
    if (data > pos) {
      out.push({ at: pos - host, length: data - pos, hole: true });
      pos = data;
    }
    const hole = Math.min(await dev.nextHole(pos), end);
    out.push({ at: pos - host, length: hole - pos, hole: false });
    pos = hole;
  }
  return out;
}

export function formatMapJson(entries: MapEntry[]): string {
  return (
    '[' +
    entries
      .map((e) => {
        const parts = [`"start": ${e.start}`, `"length": ${e.length}`, `"depth": ${e.depth}`, `"present": ${e.present}`, `"zero": ${e.zero}`, `"data": ${e.data}`, `"compressed": ${e.compressed}`];
        if (e.offset !== undefined) parts.push(`"offset": ${e.offset}`);
        if (e.filename !== undefined) parts.push(`"filename": ${JSON.stringify(e.filename)}`);
        return `{ ${parts.join(', ')}}`;
      })
      .join(',\n') +
    ']'
  );
}

export function formatMapHuman(entries: MapEntry[], paths: string[]): string {
  const lines = ['Offset          Length          Mapped to       File'];
  for (const e of entries) {
    if (!e.data || e.offset === undefined) continue;
    const hex = (n: number) => '0x' + n.toString(16).padEnd(14, ' ');
    lines.push(`${hex(e.start)}${hex(e.length)}${hex(e.offset)}${e.filename ?? paths[e.depth]}`);
  }
  return lines.join('\n');
}
