/**
 * Reads guest bytes through a chain of layers using only their ExtentMaps: the reference reader
 * used to compare guest content (tests, verification after a conversion) and, later, by streaming
 * and relocation. Format-agnostic: compressed runs are decoded by their driver.
 */
import type { SourceImage } from './driver.js';
import type { Extent, ExtentMap } from './extent-map.js';
import type { ImageChain } from './image.js';
import { createHash } from 'node:crypto';

export class GuestReader {
  private cache: { layer: number; host: number; bytes: Uint8Array } | undefined;

  private constructor(
    private readonly layers: SourceImage[],
    private readonly maps: ExtentMap[],
  ) {}

  static async create(chain: ImageChain | SourceImage[]): Promise<GuestReader> {
    const layers = Array.isArray(chain) ? chain : chain.layers;
    const maps: ExtentMap[] = [];
    for (const l of layers) maps.push(await l.mapping());
    return new GuestReader(layers, maps);
  }

  get virtualSize(): number {
    return this.maps[0]!.virtualSize;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    await this.readInto(0, out, offset);
    return out;
  }

  private async readInto(layer: number, out: Uint8Array, offset: number): Promise<void> {
    const map = this.maps[layer];
    if (!map) return; // below the chain: zeros
    const avail = Math.max(0, Math.min(out.length, map.virtualSize - offset));
    for (const e of map.range(offset, avail)) {
      const dst = out.subarray(e.guest - offset, e.guest - offset + e.length);
      switch (e.kind) {
        case 'data': {
          const dev = this.layers[layer]!.dataDev;
          let done = 0;
          while (done < dst.length) {
            const n = await dev.read(dst.subarray(done), e.host! + done);
            if (n === 0) break; // past EOF reads as zeros (a cluster may end past EOF)
            done += n;
          }
          break;
        }
        case 'zero':
          break;
        case 'compressed': {
          const bytes = await this.decompressed(layer, e);
          dst.set(bytes.subarray(e.within, e.within + e.length));
          break;
        }
        case 'unallocated':
          await this.readInto(layer + 1, dst, e.guest);
          break;
      }
    }
  }

  private async decompressed(layer: number, e: Extent & { within: number }): Promise<Uint8Array> {
    if (this.cache && this.cache.layer === layer && this.cache.host === e.host) return this.cache.bytes;
    const img = this.layers[layer]!;
    if (!img.readCompressed) throw new Error(`${img.format}: driver cannot decode compressed data`);
    const bytes = await img.readCompressed({ guest: e.guest - e.within, length: 0, kind: 'compressed', host: e.host!, hostLength: e.hostLength! });
    this.cache = { layer, host: e.host!, bytes };
    return bytes;
  }

  /** SHA-256 of the whole virtual disk, read in `chunk`-byte pieces. */
  async sha256(chunk = 4 << 20): Promise<string> {
    const h = createHash('sha256');
    for (let pos = 0; pos < this.virtualSize; pos += chunk) {
      h.update(await this.read(pos, Math.min(chunk, this.virtualSize - pos)));
    }
    return h.digest('hex');
  }
}
