/** Making, copying and removing the benchmark's images. */
import { randomFillSync } from 'node:crypto';
import { closeSync, fsyncSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { statfsSync } from 'node:fs';
import { checkNotStopping } from './cleanup.js';
import { run } from './measure.js';

const RANDOM_CHUNK = 16 << 20;

/**
 * A raw file of `bytes` random bytes (crypto-strength, so neither compression nor zero detection can
 * shortcut anything), written in 16 MiB pieces and made durable.
 */
export async function writeRandomRaw(path: string, bytes: number): Promise<void> {
  const buf = Buffer.allocUnsafe(Math.min(RANDOM_CHUNK, bytes));
  const fd = openSync(path, 'w');
  try {
    for (let pos = 0; pos < bytes; ) {
      // Between pieces a SIGINT/SIGTERM handler gets to run (the file may be many GiB); once it has, stop.
      await new Promise((r) => setImmediate(r));
      checkNotStopping();
      const len = Math.min(buf.length, bytes - pos);
      const piece = buf.subarray(0, len);
      randomFillSync(piece);
      let done = 0;
      while (done < len) done += writeSync(fd, piece, done, len - done, pos + done);
      pos += len;
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** fsync one file, so the next measured command neither waits for nor hides its writeback. */
export function syncFile(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export async function qemuImg(args: string[]): Promise<string> {
  return run('qemu-img', args);
}

/** A copy that keeps holes as holes (cp's default hole detection), made durable. */
export async function copyImage(src: string, dst: string): Promise<void> {
  rmSync(dst, { force: true });
  await run('cp', ['--sparse=auto', src, dst]);
  syncFile(dst);
}

export function remove(...paths: string[]): void {
  for (const p of paths) rmSync(p, { force: true });
}

export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

export function freeBytes(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}
