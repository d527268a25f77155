/**
 * Storage: the injectable file system around images — opening devices, and creating, removing and
 * syncing the sidecar files the conversion protocol needs (its journal). A conversion touches the disk
 * only through this, so tests can record every operation across the image and its journal in one
 * global order, and replay any prefix or subset of it as a crash.
 */
import { lstat, open as fsOpen, rename as fsRename, rm, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { FileBlockDevice } from './file.js';
import { MemoryBlockDevice } from './memory.js';
import type { BlockDevice, OpenOptions } from './types.js';
import { IoError } from '../errors.js';

export interface Storage {
  open(path: string, opts: OpenOptions): Promise<BlockDevice>;
  /** Creates an empty file for writing; fails if it exists. */
  create(path: string): Promise<BlockDevice>;
  remove(path: string): Promise<void>;
  exists(path: string): Promise<boolean>;
  /** Makes a file's creation, removal or renaming durable (fsync of its directory). */
  syncDir(path: string): Promise<void>;
  /**
   * Atomically gives the file at `from` the name `to`, replacing whatever `to` named (rename(2): both on
   * one file system). Durable once the directories of both names are synced.
   */
  rename(from: string, to: string): Promise<void>;
  /** Which file system and file a path names (stat(2): st_dev, st_ino), and whether it is a regular file. */
  identify(path: string): Promise<FileIdentity>;
}

export interface FileIdentity {
  /** The file system (st_dev): a rename works only within one. */
  device: number;
  /** The file (st_ino): two paths with the same device and inode are one file. */
  inode: number;
  regular: boolean;
  /** The path is a symbolic link (the other fields describe the file it points to). */
  symlink: boolean;
}

function ioErr(op: string, path: string, e: unknown): IoError {
  const err = e as NodeJS.ErrnoException;
  return new IoError(op, path, 0, err.code, err.message ?? String(e));
}

export const fileStorage: Storage = {
  open: (path, opts) => FileBlockDevice.open(path, opts),
  async create(path) {
    try {
      const fh = await fsOpen(path, 'wx');
      await fh.close();
    } catch (e) {
      throw ioErr('create', path, e);
    }
    return FileBlockDevice.open(path, { write: true, lock: false });
  },
  async remove(path) {
    try {
      await rm(path, { force: true });
    } catch (e) {
      throw ioErr('remove', path, e);
    }
  },
  async exists(path) {
    try {
      await stat(path);
      return true;
    } catch {
      return false;
    }
  },
  async syncDir(path) {
    const dir = dirname(path);
    try {
      const fh = await fsOpen(dir, 'r');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    } catch (e) {
      // Some filesystems refuse fsync on a directory (EINVAL); nothing more can be done there.
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EINVAL' && code !== 'EISDIR' && code !== 'EBADF') throw ioErr('fsync directory', dir, e);
    }
  },
  async rename(from, to) {
    try {
      await fsRename(from, to);
    } catch (e) {
      throw ioErr('rename', `${from} → ${to}`, e);
    }
  },
  async identify(path) {
    try {
      const l = await lstat(path);
      const st = l.isSymbolicLink() ? await stat(path) : l;
      return { device: st.dev, inode: st.ino, regular: st.isFile(), symlink: l.isSymbolicLink() };
    } catch (e) {
      throw ioErr('stat', path, e);
    }
  },
};

/** In-memory storage: a map of path → MemoryBlockDevice (shared, so reopening sees the same bytes). */
export class MemoryStorage implements Storage {
  readonly files = new Map<string, MemoryBlockDevice>();
  /** The file system a path lies on (`identify().device`): one for all, unless a test says otherwise. */
  deviceOf: (path: string) => number = () => 1;

  put(path: string, bytes: Uint8Array): MemoryBlockDevice {
    const d = MemoryBlockDevice.from(bytes, path);
    this.files.set(path, d);
    return d;
  }

  async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    const d = this.files.get(path);
    if (!d) throw new IoError('open', path, 0, 'ENOENT', 'no such file');
    return opts.write ? d : readOnlyView(d);
  }

  async create(path: string): Promise<BlockDevice> {
    if (this.files.has(path)) throw new IoError('create', path, 0, 'EEXIST', 'file exists');
    const d = new MemoryBlockDevice(path);
    this.files.set(path, d);
    return d;
  }

  async remove(path: string): Promise<void> {
    this.files.delete(path);
  }

  async exists(path: string): Promise<boolean> {
    return this.files.has(path);
  }

  async syncDir(): Promise<void> {}

  async rename(from: string, to: string): Promise<void> {
    const d = this.files.get(from);
    if (!d) throw new IoError('rename', from, 0, 'ENOENT', 'no such file');
    if (this.deviceOf(from) !== this.deviceOf(to)) throw new IoError('rename', `${from} → ${to}`, 0, 'EXDEV', 'invalid cross-device link');
    this.files.delete(from);
    this.files.set(to, d);
  }

  async identify(path: string): Promise<FileIdentity> {
    const d = this.files.get(path);
    if (!d) throw new IoError('stat', path, 0, 'ENOENT', 'no such file');
    return { device: this.deviceOf(path), inode: inodeOf(d), regular: true, symlink: false };
  }
}

const inodes = new WeakMap<MemoryBlockDevice, number>();
let nextInode = 1;
function inodeOf(d: MemoryBlockDevice): number {
  let n = inodes.get(d);
  if (n === undefined) inodes.set(d, (n = nextInode++));
  return n;
}

function readOnlyView(d: MemoryBlockDevice): BlockDevice {
  const refuse = async () => {
    throw new IoError('write', d.path, 0, 'EBADF', 'opened read-only');
  };
  return {
    path: d.path,
    writable: false,
    size: () => d.size(),
    allocated: () => d.allocated(),
    read: (b, o) => d.read(b, o),
    nextData: (o) => d.nextData(o),
    nextHole: (o) => d.nextHole(o),
    write: refuse,
    flush: async () => {},
    truncate: refuse,
    punchHole: refuse,
    close: async () => {},
  };
}
