/**
 * raw: guest byte x is file byte x. The mapping comes from SEEK_DATA/SEEK_HOLE, never from reading
 * the file: holes are zero runs (with their host offset, as qemu-img map reports them), the rest data.
 * QEMU sizes a raw disk as the file length rounded up to 512 bytes.
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { CheckReport, FormatDriver, ImageInfo, SourceImage } from '../../src/driver.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import { rawTarget } from './target.js';
import { rawStream } from './stream.js';

export const RAW_SECTOR = 512;

class RawImage implements SourceImage {
  readonly format = 'raw';
  readonly dataDev: BlockDevice;
  private map: ExtentMap | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly info: ImageInfo,
    private readonly fileSize: number,
  ) {
    this.dataDev = dev;
  }

  async mapping(): Promise<ExtentMap> {
    if (this.map) return this.map;
    const map = new ExtentMap(this.info.virtualSize);
    let pos = 0;
    while (pos < this.fileSize) {
      const data = await this.dev.nextData(pos);
      const dataStart = data === null ? this.fileSize : Math.min(data, this.fileSize);
      if (dataStart > pos) map.push({ guest: pos, length: dataStart - pos, kind: 'zero', host: pos });
      if (dataStart >= this.fileSize) break;
      const hole = Math.min(await this.dev.nextHole(dataStart), this.fileSize);
      map.push({ guest: dataStart, length: hole - dataStart, kind: 'data', host: dataStart });
      pos = hole;
    }
    // The partial last sector QEMU rounds up to reads as zeros.
    if (map.end < this.info.virtualSize) map.push({ guest: map.end, length: this.info.virtualSize - map.end, kind: 'zero', host: map.end });
    return (this.map = map);
  }

  async hostSpace(): Promise<HostSpace> {
    const hs = new HostSpace('raw', this.fileSize);
    hs.add(0, this.fileSize, 'data', 'data');
    return hs;
  }

  async check(): Promise<CheckReport> {
    return { format: 'raw', corruptions: 0, leaks: 0, checkErrors: 0, messages: [], imageEndOffset: this.fileSize };
  }

  async close(): Promise<void> {}
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  description: 'raw disk image: guest offset = file offset',
  probe: () => 1,
  async open(dev) {
    const size = await dev.size();
    const virtualSize = Math.ceil(size / RAW_SECTOR) * RAW_SECTOR;
    const info: ImageInfo = {
      format: 'raw',
      virtualSize,
      dirty: false,
      corrupt: false,
      features: [],
      details: { 'file-length': size },
    };
    return new RawImage(dev, info, size);
  },
  get target() {
    return rawTarget;
  },
  stream: rawStream,
};
