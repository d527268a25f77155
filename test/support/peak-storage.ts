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
import { afterAll, beforeAll } from 'vitest';
import { PassThroughStorage, passThroughDevice } from './pass-through.js';
import { withTmpDir } from './qemu.js';

const MiB = 1 << 20;

/** Every device it opens for writing or creates is watched: after each mutation the sum of allocated bytes is sampled. */
export class PeakStorage extends PassThroughStorage {
  private readonly devices = new Map<string, BlockDevice>();
  peakAlloc = 0;
  peakSize = 0;
  samples = 0;
  private startAlloc = 0;
  private startSize = 0;

  constructor(inner: Storage = fileStorage) {
    super(inner);
  }

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

  protected override wrap(d: BlockDevice, path: string, opts: OpenOptions): BlockDevice {
    if (!opts.write) return d;
    // One device per path: a path opened twice (image read-only and writable) is counted once.
    this.devices.set(path, d);
    const sampled =
      <A extends unknown[]>(op: (...a: A) => Promise<void>) =>
      async (...a: A): Promise<void> => {
        await op(...a);
        await this.sample();
      };
    return passThroughDevice(d, {
      write: sampled((b, o) => d.write(b, o)),
      truncate: sampled((n) => d.truncate(n)),
      punchHole: sampled((o, n) => d.punchHole(o, n)),
      close: async () => {
        // Under whatever name it has now (a rename moves it).
        for (const [p, x] of this.devices) if (x === d) this.devices.delete(p);
        await d.close();
      },
    });
  }

  override async remove(path: string): Promise<void> {
    this.devices.delete(path);
    await super.remove(path);
  }
  override rename(from: string, to: string): Promise<void> {
    // An open device follows its file to the new name (an adopted data file, written on as the image);
    // the file the name gave before is unlinked (its space goes when it is closed).
    const d = this.devices.get(from);
    this.devices.delete(from);
    if (d) this.devices.set(to, d);
    else this.devices.delete(to);
    return super.rename(from, to);
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

/**
 * A suite's temporary directory and `src.raw` in it: `bytes` of random data, written before the suite's
 * tests and removed with the directory after them (call inside `describe`).
 */
export function randomRawSuite(prefix: string, bytes: number): { tmp: ReturnType<typeof withTmpDir>; raw: string } {
  const tmp = withTmpDir(prefix);
  const raw = tmp.path('src.raw');
  beforeAll(() => randomRaw(raw, bytes));
  afterAll(() => tmp.cleanup());
  return { tmp, raw };
}
