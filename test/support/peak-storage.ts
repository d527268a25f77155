/**
 * A Storage that measures the disk space a conversion really takes: after every write, truncate and
 * punched hole of a file it opened for writing (the image, the journal, a companion file) it reads the
 * sum of their allocated bytes (st_blocks·512, which on ext4 includes delayed allocation) and apparent
 * sizes, and keeps the largest growth over the start. Used to hold plans' peakExtraBytes to the truth.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';
import { fileStorage, type Storage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';

const MiB = 1 << 20;

/** Every device it opens or creates is watched: after each mutation the sum of allocated bytes is sampled. */
export class PeakStorage implements Storage {
  private readonly devices = new Map<string, BlockDevice>();
  peakAlloc = 0;
  peakSize = 0;
  samples = 0;
  private startAlloc = 0;
  private startSize = 0;

  constructor(private readonly inner: Storage = fileStorage) {}

  /** The allocated bytes and apparent sizes of every watched file before the conversion. */
  async start(paths: string[]): Promise<void> {
    let alloc = 0;
    let size = 0;
    for (const p of paths) {
      const d = await this.inner.open(p, { write: false });
      alloc += await d.allocated();
      size += await d.size();
      await d.close();
    }
    this.startAlloc = alloc;
    this.startSize = size;
  }

  private async sample(): Promise<void> {
    let alloc = 0;
    let size = 0;
    for (const d of this.devices.values()) {
      alloc += await d.allocated();
      size += await d.size();
    }
    this.samples++;
    this.peakAlloc = Math.max(this.peakAlloc, alloc - this.startAlloc);
    this.peakSize = Math.max(this.peakSize, size - this.startSize);
  }

  private wrap(d: BlockDevice, path: string): BlockDevice {
    // One device per path: a path opened twice (image read-only and writable) is counted once.
    this.devices.set(path, d);
    const sample = () => this.sample();
    const devices = this.devices;
    return {
      path: d.path,
      get writable() {
        return d.writable;
      },
      size: () => d.size(),
      allocated: () => d.allocated(),
      read: (b, o) => d.read(b, o),
      nextData: (o) => d.nextData(o),
      nextHole: (o) => d.nextHole(o),
      flush: () => d.flush(),
      async write(b, o) {
        await d.write(b, o);
        await sample();
      },
      async truncate(n) {
        await d.truncate(n);
        await sample();
      },
      async punchHole(o, n) {
        await d.punchHole(o, n);
        await sample();
      },
      async close() {
        if (devices.get(path) === d) devices.delete(path);
        await d.close();
      },
    };
  }

  async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    const d = await this.inner.open(path, opts);
    return opts.write ? this.wrap(d, path) : d;
  }
  async create(path: string): Promise<BlockDevice> {
    return this.wrap(await this.inner.create(path), path);
  }
  async remove(path: string): Promise<void> {
    this.devices.delete(path);
    await this.inner.remove(path);
  }
  exists(path: string): Promise<boolean> {
    return this.inner.exists(path);
  }
  syncDir(path: string): Promise<void> {
    return this.inner.syncDir(path);
  }
  rename(from: string, to: string): Promise<void> {
    this.devices.delete(from);
    return this.inner.rename(from, to);
  }
  identify(path: string): ReturnType<Storage['identify']> {
    return this.inner.identify(path);
  }
}

export function randomRaw(path: string, bytes: number): void {
  const fd = openSync(path, 'w');
  const buf = Buffer.allocUnsafe(16 * MiB);
  try {
    for (let pos = 0; pos < bytes; pos += buf.length) {
      randomFillSync(buf);
      writeSync(fd, buf, 0, Math.min(buf.length, bytes - pos), pos);
    }
  } finally {
    closeSync(fd);
  }
}
