/**
 * The base of the test storages that watch or disturb a conversion (PeakStorage, RecordingStorage,
 * FaultyStorage): every call goes through to the wrapped storage or device unchanged, so each of them
 * states only what it changes.
 */
import type { FileIdentity, Storage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';

/** The operations of a device a wrapper replaces (and `path`, the name it gives the device). */
export type DeviceChanges = Partial<Omit<BlockDevice, 'writable'>>;

/** `d` with `changes` in place of its own operations; `writable` always reads `d`'s. */
export function passThroughDevice(d: BlockDevice, changes: DeviceChanges = {}): BlockDevice {
  return {
    path: d.path,
    size: () => d.size(),
    allocated: () => d.allocated(),
    read: (b, o) => d.read(b, o),
    write: (b, o) => d.write(b, o),
    flush: () => d.flush(),
    truncate: (n) => d.truncate(n),
    punchHole: (o, n) => d.punchHole(o, n),
    nextData: (o) => d.nextData(o),
    nextHole: (o) => d.nextHole(o),
    close: () => d.close(),
    ...changes,
    get writable() {
      return d.writable;
    },
  };
}

/** A storage that forwards everything to `inner`; subclasses override what they change. */
export class PassThroughStorage<S extends Storage = Storage> implements Storage {
  constructor(readonly inner: S) {}

  /** The device handed out for a file opened (or created: `write` set) through this storage. */
  protected wrap(d: BlockDevice, _path: string, _opts: OpenOptions): BlockDevice {
    return d;
  }

  async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    return this.wrap(await this.inner.open(path, opts), path, opts);
  }
  async create(path: string): Promise<BlockDevice> {
    return this.wrap(await this.inner.create(path), path, { write: true });
  }
  remove(path: string): Promise<void> {
    return this.inner.remove(path);
  }
  exists(path: string): Promise<boolean> {
    return this.inner.exists(path);
  }
  syncDir(path: string): Promise<void> {
    return this.inner.syncDir(path);
  }
  rename(from: string, to: string): Promise<void> {
    return this.inner.rename(from, to);
  }
  identify(path: string): Promise<FileIdentity> {
    return this.inner.identify(path);
  }
}
