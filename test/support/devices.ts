/**
 * Test devices built on MemoryBlockDevice: one that refuses every mutation (so a read path that
 * writes is caught), and helpers to load files into memory.
 */
import { readFileSync } from 'node:fs';
import type { BlockDevice, DeviceOpener } from '../../src/blockdev/types.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';

export class NoWriteDevice implements BlockDevice {
  readonly writable = false;
  constructor(private readonly inner: BlockDevice) {}
  get path(): string {
    return this.inner.path;
  }
  size() {
    return this.inner.size();
  }
  allocated() {
    return this.inner.allocated();
  }
  read(buf: Uint8Array, offset: number) {
    return this.inner.read(buf, offset);
  }
  nextData(o: number) {
    return this.inner.nextData(o);
  }
  nextHole(o: number) {
    return this.inner.nextHole(o);
  }
  close() {
    return this.inner.close();
  }
  async write(): Promise<void> {
    throw new Error('write attempted on a read-only path');
  }
  async flush(): Promise<void> {
    throw new Error('flush attempted on a read-only path');
  }
  async truncate(): Promise<void> {
    throw new Error('truncate attempted on a read-only path');
  }
  async punchHole(): Promise<void> {
    throw new Error('punchHole attempted on a read-only path');
  }
}

export function memFromFile(path: string): MemoryBlockDevice {
  return MemoryBlockDevice.from(new Uint8Array(readFileSync(path)), path);
}

/** An opener over a set of in-memory files keyed by absolute path. */
export function memOpener(files: Map<string, Uint8Array>): DeviceOpener {
  return async (path) => {
    const bytes = files.get(path);
    if (!bytes) throw new Error(`no such in-memory file: ${path}`);
    return new NoWriteDevice(MemoryBlockDevice.from(bytes, path));
  };
}
