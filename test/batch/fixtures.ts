/**
 * A directory of mixed images for the batch tests, made by the real qemu-img / qemu-io: every
 * source format, one that cannot be converted (a qcow2 with an internal snapshot), one corrupt (a
 * qcow2 whose cluster_bits field was flipped), one already in the target format, optionally slow
 * ones (512-byte qcow2 clusters: every data cluster moves to QED) so a run can be stopped midway.
 * Each image's pristine copy is kept so results can be judged with qemu-img compare.
 */
import { closeSync, copyFileSync, ftruncateSync, openSync, readFileSync, statSync, symlinkSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { expect } from 'vitest';
import { qemuImg, qemuImgStatus, qemuIo } from '../support/qemu.js';
import { allDrivers } from '../../drivers/index.js';
import { fileStorage, type Storage } from '../../src/blockdev/storage.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { ConversionFailedError, convertInPlace } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { IoError } from '../../src/errors.js';

export interface Fixture {
  name: string;
  /** The format qemu-img names it by (vpc for VHD). */
  qemuFormat: string;
  /** What a batch to QED must end with. */
  expect: 'converted' | 'skipped' | 'refused';
}

const MiB = 1 << 20;

/** Writes a sparse raw file with the given runs of a byte value (offsets and lengths in MiB). */
export function rawWithRuns(path: string, sizeMiB: number, runs: readonly (readonly [number, number, number])[]): void {
  const fd = openSync(path, 'w');
  try {
    for (const [at, mib, byte] of runs) writeSync(fd, Buffer.alloc(mib * MiB, byte), 0, mib * MiB, at * MiB);
    ftruncateSync(fd, sizeMiB * MiB);
  } finally {
    closeSync(fd);
  }
}

/**
 * The mixed set (a few MiB each). `slow` lists the data sizes (MiB) of 512 B-cluster qcow2 images
 * that come first (slow0.qcow2, …).
 */
export function makeMixedImages(dir: string, opts: { slow?: readonly number[] } = {}): Fixture[] {
  const out: Fixture[] = [];
  const p = (n: string) => join(dir, n);
  const scratch = p('.scratch.raw');
  for (const [i, data] of (opts.slow ?? []).entries()) {
    const name = `slow${i}.qcow2`;
    rawWithRuns(scratch, data + 8, [[0, data, 0x40 + i], [data + 4, 1, 0x50 + i]]);
    qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', scratch, p(name)]);
    out.push({ name, qemuFormat: 'qcow2', expect: 'converted' });
  }
  qemuImg(['create', '-q', '-f', 'qcow2', p('plain.qcow2'), '8M']);
  qemuIo(p('plain.qcow2'), 'qcow2', ['write -P 0x11 0 1M', 'write -P 0x12 5M 512k']);
  out.push({ name: 'plain.qcow2', qemuFormat: 'qcow2', expect: 'converted' });

  qemuImg(['create', '-q', '-f', 'vmdk', p('disk.vmdk'), '8M']);
  qemuIo(p('disk.vmdk'), 'vmdk', ['write -P 0x21 64k 1M', 'write -P 0x22 7M 64k']);
  out.push({ name: 'disk.vmdk', qemuFormat: 'vmdk', expect: 'converted' });

  qemuImg(['create', '-q', '-f', 'vpc', p('dynamic.vhd'), '8M']);
  qemuIo(p('dynamic.vhd'), 'vpc', ['write -P 0x31 0 1M', 'write -P 0x32 4M 4k']);
  out.push({ name: 'dynamic.vhd', qemuFormat: 'vpc', expect: 'converted' });

  qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', p('fixed.vhd'), '4M']);
  qemuIo(p('fixed.vhd'), 'vpc', ['write -P 0x41 0 512k', 'write -P 0x42 3M 64k']);
  out.push({ name: 'fixed.vhd', qemuFormat: 'vpc', expect: 'converted' });

  rawWithRuns(p('disk.raw'), 6, [[0, 1, 0x51], [4, 1, 0x52]]);
  out.push({ name: 'disk.raw', qemuFormat: 'raw', expect: 'converted' });

  qemuImg(['create', '-q', '-f', 'qed', p('already.qed'), '4M']);
  qemuIo(p('already.qed'), 'qed', ['write -P 0x61 0 256k']);
  out.push({ name: 'already.qed', qemuFormat: 'qed', expect: 'skipped' });

  qemuImg(['create', '-q', '-f', 'qcow2', p('snapshot.qcow2'), '4M']);
  qemuIo(p('snapshot.qcow2'), 'qcow2', ['write -P 0x71 0 256k']);
  qemuImg(['snapshot', '-c', 's1', p('snapshot.qcow2')]);
  out.push({ name: 'snapshot.qcow2', qemuFormat: 'qcow2', expect: 'refused' });

  qemuImg(['create', '-q', '-f', 'qcow2', p('corrupt.qcow2'), '4M']);
  qemuIo(p('corrupt.qcow2'), 'qcow2', ['write -P 0x81 0 256k']);
  // cluster_bits (big-endian u32 at byte 20) = 99: no such cluster size.
  const fd = openSync(p('corrupt.qcow2'), 'r+');
  writeSync(fd, Buffer.from([0, 0, 0, 99]), 0, 4, 20);
  closeSync(fd);
  out.push({ name: 'corrupt.qcow2', qemuFormat: 'qcow2', expect: 'refused' });
  return out;
}

/** Keeps a pristine copy of every image (NAME.orig) and returns each image's SHA-256. */
export function keepOriginals(dir: string, fixtures: readonly Fixture[]): Map<string, string> {
  const sums = new Map<string, string>();
  for (const f of fixtures) {
    copyFileSync(join(dir, f.name), join(dir, `${f.name}.orig`));
    sums.set(f.name, sha256(join(dir, f.name)));
  }
  return sums;
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

export function link(dir: string, target: string, name: string): void {
  symlinkSync(target, join(dir, name));
}

/**
 * The image as qemu-img sees it: its format, a guest identical to the pristine copy (qemu-img
 * compare), and a clean check (no corruption, no leaks, no check errors).
 */
export function judgeConverted(dir: string, f: Fixture, to: string): void {
  const img = join(dir, f.name);
  const info = JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string; 'virtual-size': number };
  expect(info.format, `${f.name} format`).toBe(to);
  const orig = JSON.parse(qemuImg(['info', '--output=json', '-f', f.qemuFormat, `${img}.orig`])) as { 'virtual-size': number };
  expect(info['virtual-size'], `${f.name} virtual size`).toBe(orig['virtual-size']);
  const cmp = qemuImgStatus(['compare', '-f', f.qemuFormat, '-F', to, `${img}.orig`, img]);
  expect(cmp.status, `${f.name}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  const chk = qemuImgStatus(['check', '--output=json', '-f', to, img]);
  const j = JSON.parse(chk.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  expect(j.corruptions ?? 0, `${f.name} corruptions`).toBe(0);
  expect(j['check-errors'] ?? 0, `${f.name} check errors`).toBe(0);
  // QEMU 7.2 counts ⌊N/(cs−1)⌋ phantom leaks on an N-cluster QED (DESIGN.md, test/engine/convert-qed.test.ts):
  // exactly that many, no more and no fewer.
  let phantom = 0;
  if (to === 'qed') {
    const cs = (JSON.parse(qemuImg(['info', '--output=json', '-f', 'qed', img])) as { 'cluster-size': number })['cluster-size'];
    phantom = Math.floor(Math.floor(statSync(img).size / cs) / (cs - 1));
  }
  expect(j.leaks ?? 0, `${f.name} leaks`).toBe(phantom);
}

/**
 * Leaves `path` as an interrupted conversion to `to`, through the library with a storage that
 * fails on purpose: 'prepared' — every write to the image fails from the first one, and so does
 * the clean-up, so the journal keeps only its PREPARE record (recovery rolls back); 'done' — the
 * journal cannot be removed at the end, so it holds DONE (recovery finishes the reclaim).
 */
export async function interrupt(path: string, to: string, state: 'prepared' | 'done'): Promise<void> {
  const storage: Storage = {
    ...fileStorage,
    async open(p, opts) {
      const dev = await fileStorage.open(p, opts);
      if (state !== 'prepared' || p !== path || !opts.write) return dev;
      const fail = async () => {
        throw new IoError('write', p, 0, 'EIO', 'injected failure');
      };
      const failing: BlockDevice = {
        path: dev.path,
        writable: true,
        size: () => dev.size(),
        allocated: () => dev.allocated(),
        read: (b, o) => dev.read(b, o),
        nextData: (o) => dev.nextData(o),
        nextHole: (o) => dev.nextHole(o),
        flush: () => dev.flush(),
        close: () => dev.close(),
        write: fail,
        truncate: fail,
        punchHole: fail,
      };
      return failing;
    },
    async remove(p) {
      if (state === 'done' && p === journalPath(path)) throw new IoError('remove', p, 0, 'EIO', 'injected failure');
      return fileStorage.remove(p);
    },
  };
  const e = await convertInPlace(path, { to, drivers: allDrivers, storage }).then(
    () => undefined,
    (x: unknown) => x,
  );
  if (!(e instanceof ConversionFailedError) || e.imageState !== 'needs-recover') throw new Error(`expected an interrupted conversion, got ${String(e)}`);
}
