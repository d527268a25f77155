/**
 * BlockDevice over a real file. Reads and writes go through fs/promises; holes, punch and locks
 * through the syscalls module, with correct fallbacks where it is unavailable.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { IoError, LockedError } from '../errors.js';
import { F_WRLCK, ofdProbe, ofdTryLock, punchHole, seekDataHole, startWriteback } from './syscalls.js';
import type { BlockDevice, OpenOptions } from './types.js';

/** QEMU (block/file-posix.c) locks byte 100+perm for permissions it holds, 200+perm for ones it denies. */
const QEMU_LOCK_FIRST = 100;
const QEMU_LOCK_LAST = 299;

export class FileBlockDevice implements BlockDevice {
  private punchSupported = true;
  private seekSupported = true;

  private constructor(
    readonly path: string,
    readonly writable: boolean,
    private readonly fh: FileHandle,
  ) {}

  static async open(path: string, opts: OpenOptions = {}): Promise<FileBlockDevice> {
    const write = opts.write ?? false;
    let fh: FileHandle;
    try {
      fh = await open(path, write ? 'r+' : 'r');
    } catch (e) {
      throw ioError('open', path, 0, e);
    }
    const dev = new FileBlockDevice(path, write, fh);
    if (opts.lock ?? write) {
      try {
        dev.lockExclusive();
      } catch (e) {
        await fh.close();
        throw e;
      }
    }
    return dev;
  }

  /** Exclusive OFD write lock over the whole file; refuses when QEMU or anyone else holds a lock. */
  private lockExclusive(): void {
    const r = ofdTryLock(this.fh.fd, F_WRLCK, 0, 0);
    if (r !== 'busy') return; // 'unsupported': no OFD locks here (non-Linux, or NFS without them)
    const holder = ofdProbe(this.fh.fd, F_WRLCK, 0, 0);
    const byQemu =
      holder && holder.pid === -1 && holder.start >= QEMU_LOCK_FIRST && holder.start <= QEMU_LOCK_LAST;
    throw new LockedError(
      byQemu
        ? `${this.path} is in use by QEMU (it holds OFD lock byte ${holder.start}); shut the VM down or detach the disk first`
        : `${this.path} is locked by another process (another imgconv or a VM); refusing to open it for writing`,
    );
  }

  async size(): Promise<number> {
    try {
      return (await this.fh.stat()).size;
    } catch (e) {
      throw ioError('stat', this.path, 0, e);
    }
  }

  async allocated(): Promise<number> {
    try {
      return (await this.fh.stat()).blocks * 512;
    } catch (e) {
      throw ioError('stat', this.path, 0, e);
    }
  }

  async read(buf: Uint8Array, offset: number): Promise<number> {
    try {
      const { bytesRead } = await this.fh.read(buf, 0, buf.length, offset);
      return bytesRead;
    } catch (e) {
      throw ioError('read', this.path, offset, e);
    }
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    try {
      while (done < buf.length) {
        const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, offset + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw ioError('write', this.path, offset + done, e);
    }
  }

  async flush(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw ioError('fdatasync', this.path, 0, e);
    }
  }

  private writebackSupported = true;
  /** The writeback hint in flight: one at a time, as it holds a thread of the pool reads and writes need too. */
  private writeback: Promise<void> | undefined;
  /** The range hinted while one was in flight (merged), started when it returns. */
  private writebackNext: { start: number; end: number } | undefined;

  startWriteback(offset: number, length: number): void {
    if (!this.writebackSupported || this.closed || length <= 0) return;
    if (this.writeback) {
      const n = this.writebackNext;
      this.writebackNext = { start: Math.min(n?.start ?? offset, offset), end: Math.max(n?.end ?? 0, offset + length) };
      return;
    }
    this.writeback = startWriteback(this.fh.fd, offset, length).then((ok) => {
      if (!ok) this.writebackSupported = false;
      this.writeback = undefined;
      const n = this.writebackNext;
      this.writebackNext = undefined;
      if (n) this.startWriteback(n.start, n.end - n.start);
    });
  }

  async truncate(length: number): Promise<void> {
    try {
      await this.fh.truncate(length);
    } catch (e) {
      throw ioError('truncate', this.path, length, e);
    }
  }

  async punchHole(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    if (this.punchSupported && punchHole(this.fh.fd, offset, length)) return;
    this.punchSupported = false;
    // Fallback: the range must read as zeros afterwards, which is all callers rely on.
    const size = await this.size();
    const end = Math.min(offset + length, size);
    const zeros = new Uint8Array(Math.min(1 << 20, Math.max(0, end - offset)));
    for (let p = offset; p < end; p += zeros.length) {
      await this.write(zeros.subarray(0, Math.min(zeros.length, end - p)), p);
    }
  }

  // No fstat per call: lseek itself answers ENXIO at or past the end of the file (null), and
  // SEEK_HOLE finds the implicit hole at the end. The length is asked only where the answer needs it.
  async nextData(offset: number): Promise<number | null> {
    if (this.seekSupported) {
      const r = seekDataHole(this.fh.fd, offset, false);
      if (r !== undefined) return r;
      this.seekSupported = false;
    }
    return offset < (await this.size()) ? offset : null; // fallback: everything is data
  }

  async nextHole(offset: number): Promise<number> {
    if (this.seekSupported) {
      const r = seekDataHole(this.fh.fd, offset, true);
      if (r !== undefined) return r ?? (await this.size());
      this.seekSupported = false;
    }
    return await this.size();
  }

  private closed = false;

  /** Idempotent: a two-step conversion's second step and its caller may both close. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // No hint may still be running on the descriptor when it is closed (its number could be reused).
    this.writebackNext = undefined;
    while (this.writeback) await this.writeback;
    await this.fh.close(); // closing the descriptor releases its OFD lock
  }
}

function ioError(op: string, path: string, offset: number, e: unknown): IoError {
  const err = e as NodeJS.ErrnoException;
  return new IoError(op, path, offset, err.code, err.message ?? String(e));
}

export async function openFileDevice(path: string, opts: OpenOptions = {}): Promise<BlockDevice> {
  return FileBlockDevice.open(path, opts);
}
