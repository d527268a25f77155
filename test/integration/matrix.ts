/**
 * The fixture matrix as the tests see it: rows of matrix.tsv, the generator, and the checks shared
 * by the live (qemu-img) and the recorded comparison.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync, ftruncateSync, writeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { allDrivers } from '../../drivers/index.js';
import { openFileDevice } from '../../src/blockdev/file.js';
import type { ImageInfo } from '../../src/driver.js';
import { checkExitCode, checkImage } from '../../src/check.js';
import { GuestReader } from '../../src/guest.js';
import { openImage, type ImageChain } from '../../src/image.js';
import { mapChain } from '../../src/map.js';
import { NoWriteDevice } from '../support/devices.js';
import { diffMaps, type RawMapEntry } from '../support/qemu-map.js';
import { DIGEST_CHUNK, type DigestKind } from '../support/qemu.js';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const GENERATE = join(REPO, 'fixtures/generate.sh');
export const SMALL_DIR = join(REPO, 'fixtures/small');

export interface MatrixRow {
  name: string;
  /** Relative to the matrix directory. */
  path: string;
  qemuFormat: string;
  imgconvFormat: string;
  notes: string;
}

export function parseMatrix(tsv: string): MatrixRow[] {
  return tsv
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l, i) => {
      const f = l.split('\t');
      if (f.length !== 5) throw new Error(`matrix line ${i + 1}: ${f.length} columns, expected 5`);
      return { name: f[0]!, path: f[1]!, qemuFormat: f[2]!, imgconvFormat: f[3]!, notes: f[4]! };
    });
}

/** The rows generate.sh would build, without building anything (needs bash only). */
export function listMatrix(small = false): MatrixRow[] {
  return parseMatrix(execFileSync('bash', [GENERATE, '--list', ...(small ? ['--small'] : [])], { encoding: 'utf8' }));
}

export function generateMatrix(dir: string): MatrixRow[] {
  execFileSync('bash', [GENERATE, dir], { stdio: ['ignore', 'ignore', 'pipe'] });
  return parseMatrix(readFileSync(join(dir, 'matrix.tsv'), 'utf8'));
}

export const isProbeTrap = (r: MatrixRow) => r.notes.startsWith('probe-trap');

/** Opens read-only through NoWriteDevice, so any write on the read path fails the test. */
export function open(path: string, format?: string): Promise<ImageChain> {
  return openImage(path, {
    drivers: allDrivers,
    ...(format ? { format } : {}),
    opener: async (p, o) => new NoWriteDevice(await openFileDevice(p, o)),
  });
}

/** What QEMU says about one fixture (live from qemu-img, or recorded in fixtures/small/expected). */
export interface QemuAnswer {
  virtualSize: number;
  map: RawMapEntry[];
  /** Digest of the guest disk (see DigestKind), of the kind digestKindFor(virtualSize) picks. */
  digest: Promise<string>;
  /** `qemu-img info --output=json`, for the fields both print (cluster size, backing, dirty flag). */
  info?: Record<string, unknown>;
}

/** qemu-img info fields that imgconv's ImageInfo also carries, compared when qemu prints them. */
function infoProblems(qinfo: Record<string, unknown>, info: ImageInfo): string[] {
  const mine: Record<string, unknown> = {
    'cluster-size': info.clusterSize,
    'backing-filename': info.backing?.filename,
    'backing-filename-format': info.backing?.format,
    'dirty-flag': info.dirty,
  };
  const out: string[] = [];
  for (const [k, v] of Object.entries(mine)) {
    const q = qinfo[k];
    if (q === undefined && k !== 'backing-filename') continue; // qemu omits it: nothing to compare
    if (q !== v) out.push(`info ${k}: qemu ${JSON.stringify(q)}, imgconv ${JSON.stringify(v)}`);
  }
  return out;
}

/** Disks above this size are compared with the chunked digest (hashing 10 GiB twice takes ~30 s). */
export const FULL_SHA_LIMIT = 1 << 30;

export function digestKindFor(virtualSize: number): DigestKind {
  return virtualSize > FULL_SHA_LIMIT ? 'chunked' : 'sha256';
}

/** The guest side of the digest: GuestReader.sha256(), or the chunked digest read through GuestReader. */
export async function guestDigest(chain: ImageChain, kind: DigestKind): Promise<string> {
  const reader = await GuestReader.create(chain);
  if (kind === 'sha256') return reader.sha256();
  const h = createHash('sha256');
  const zero = Buffer.alloc(DIGEST_CHUNK);
  for (let pos = 0; pos < reader.virtualSize; pos += DIGEST_CHUNK) {
    const n = Math.min(DIGEST_CHUNK, reader.virtualSize - pos);
    const b = Buffer.from((await reader.read(pos, n)).buffer, 0, n);
    if (b.equals(zero.subarray(0, n))) h.update('Z' + n);
    else h.update(createHash('sha256').update(b).digest('hex'));
  }
  return h.digest('hex');
}

/**
 * Compares imgconv with QEMU on one fixture and returns every problem found, one line each (empty
 * when they agree): format name, virtual size, normalised map, guest SHA-256, check exit code.
 */
export async function compareFixture(row: MatrixRow, file: string, qemu: QemuAnswer): Promise<string[]> {
  const problems: string[] = [];
  let chain: ImageChain;
  try {
    chain = await open(file, isProbeTrap(row) ? 'raw' : undefined);
  } catch (e) {
    // Wait for the qemu side so no child process outlives the test.
    await qemu.digest.catch(() => {});
    return [`open failed: ${(e as Error).message}`];
  }
  try {
    const top = chain.layers[0]!;
    if (top.format !== row.imgconvFormat) problems.push(`format: expected ${row.imgconvFormat}, got ${top.format}`);
    if (top.info.virtualSize !== qemu.virtualSize) problems.push(`virtual size: qemu ${qemu.virtualSize}, imgconv ${top.info.virtualSize}`);
    if (qemu.info) problems.push(...infoProblems(qemu.info, top.info));
    try {
      const d = diffMaps(qemu.map, await mapChain(chain));
      if (d) problems.push(d);
    } catch (e) {
      problems.push(`map failed: ${(e as Error).message}`);
    }
    try {
      const kind = digestKindFor(qemu.virtualSize);
      const [mine, theirs] = await Promise.all([guestDigest(chain, kind), qemu.digest]);
      if (mine !== theirs) problems.push(`guest content (${kind} digest): qemu ${theirs}, imgconv ${mine}`);
    } catch (e) {
      problems.push(`guest read failed: ${(e as Error).message}`);
    }
    try {
      const report = await checkImage(top);
      const code = checkExitCode(report);
      if (code !== 0) problems.push(`check exit code ${code}: ${report.corruptions} corruptions, ${report.leaks} leaks; ${report.messages.slice(0, 3).join(' | ')}`);
    } catch (e) {
      problems.push(`check failed: ${(e as Error).message}`);
    }
  } finally {
    await qemu.digest.catch(() => {});
    await chain.close();
  }
  return problems;
}

/**
 * Probing safety: opening a probe trap without a format must give raw, or fail with a message that
 * tells the user to pass -f raw; never another format.
 */
export async function probeTrapProblem(file: string): Promise<string | null> {
  let chain: ImageChain;
  try {
    chain = await open(file);
  } catch (e) {
    const msg = (e as Error).message;
    return /-f raw/.test(msg) ? null : `probing failed without naming -f raw: ${msg}`;
  }
  const fmt = chain.layers[0]!.format;
  await chain.close();
  return fmt === 'raw' ? null : `probed as ${fmt}, which QEMU refuses to open (it is a raw disk with a stray magic)`;
}

const BLOCK = 4096;

/**
 * Copies every file of `src` (not subfolders) into `dst`, leaving a hole for each aligned all-zero
 * 4 KiB block: the same holes `fallocate --dig-holes` made before the answers were recorded (git
 * keeps no holes). The partial last block is always written.
 */
export function sparseCopyDir(src: string, dst: string): void {
  mkdirSync(dst, { recursive: true });
  const buf = Buffer.alloc(1 << 20);
  for (const name of readdirSync(src)) {
    const from = join(src, name);
    if (!statSync(from).isFile()) continue;
    const size = statSync(from).size;
    const inFd = openSync(from, 'r');
    const outFd = openSync(join(dst, name), 'w');
    try {
      for (let pos = 0; pos < size; ) {
        const n = readSync(inFd, buf, 0, Math.min(buf.length, size - pos), pos);
        if (n === 0) break;
        for (let b = 0; b < n; b += BLOCK) {
          const piece = buf.subarray(b, Math.min(b + BLOCK, n));
          const full = piece.length === BLOCK;
          if (full && isZero(piece)) continue;
          writeSync(outFd, piece, 0, piece.length, pos + b);
        }
        pos += n;
      }
      ftruncateSync(outFd, size);
    } finally {
      closeSync(inFd);
      closeSync(outFd);
    }
  }
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}
