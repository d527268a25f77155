/**
 * Running the real qemu-img / qemu-io. On CI (or with IMGCONV_REQUIRE_QEMU=1, which the test
 * command sets) a missing qemu-img is a failure, never a skip.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';

export function hasQemu(): boolean {
  const r = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' });
  return r.status === 0;
}

export const qemuRequired = process.env.CI === 'true' || process.env.IMGCONV_REQUIRE_QEMU === '1';

/** True when qemu tests should run; throws when they are required but qemu-img is missing. */
export function qemuAvailable(): boolean {
  const ok = hasQemu();
  if (!ok && qemuRequired) throw new Error('qemu-img is required here (CI or IMGCONV_REQUIRE_QEMU=1) but was not found');
  return ok;
}

export function qemuImg(args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs qemu-img and returns status/stdout/stderr without throwing. */
/**
 * `cwd`: QEMU 7.2 opens a qcow2's relative external data file name from its working directory, not
 * beside the image; callers judging such an image run qemu-img in the image's directory.
 */
export function qemuImgStatus(args: string[], cwd?: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8', ...(cwd ? { cwd } : {}) });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** qemu-io commands (e.g. 'write -P 0xab 0 64k') against an image. */
export function qemuIo(file: string, format: string, cmds: string[]): void {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  execFileSync('qemu-io', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export function withTmpDir(prefix = 'imgconv-test-'): { dir: string; cleanup: () => void; path: (name: string) => string } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }), path: (n) => join(dir, n) };
}

// ---- Helpers for the fixture matrix (test/integration). ----

/**
 * qemu-img run from the image's own folder with the image named relatively: QEMU resolves a
 * relative qcow2 data_file name against its working directory (backing names against the image's
 * folder), so this is the way both resolve next to the image, as imgconv does.
 */
export function qemuImgBeside(file: string, args: string[]): string {
  return execFileSync('qemu-img', [...args, basename(file)], {
    cwd: dirname(file),
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 64 << 20,
  });
}

/** `qemu-img info --output=json -f <fmt>` parsed. */
export function qemuInfoJson(file: string, format: string): Record<string, unknown> {
  return JSON.parse(qemuImgBeside(file, ['info', '--output=json', '-f', format])) as Record<string, unknown>;
}

/** `qemu-img map --output=json -f <fmt>` as text (parse with parseMapJson from qemu-map.ts). */
export function qemuMapText(file: string, format: string): string {
  return qemuImgBeside(file, ['map', '--output=json', '-f', format]);
}

/**
 * How guest content is compared. 'sha256': SHA-256 of the whole disk. 'chunked': for large sparse
 * disks, SHA-256 over the list of 4 MiB chunks, each entry "Z<length>" for an all-zero chunk or
 * the chunk's own SHA-256 (as strong for equality, and all-zero chunks cost a memcmp instead of a
 * hash). Both sides must use the same kind.
 */
export type DigestKind = 'sha256' | 'chunked';
export const DIGEST_CHUNK = 4 << 20;

/**
 * The digest of a file, computed in a child node process reading 4 MiB pieces: memory stays small,
 * and the work runs on another core while the caller digests its own side.
 */
export function digestFileInChild(file: string, kind: DigestKind): Promise<string> {
  const code = [
    "const fs = require('node:fs'); const crypto = require('node:crypto');",
    'const [file, kind] = process.argv.slice(1); const CHUNK = ' + DIGEST_CHUNK + ';',
    'const h = crypto.createHash("sha256"); const zero = Buffer.alloc(CHUNK);',
    'const fd = fs.openSync(file, "r"); const buf = Buffer.allocUnsafe(CHUNK); let pos = 0;',
    'for (;;) {',
    '  let n = 0; for (;;) { const r = fs.readSync(fd, buf, n, CHUNK - n, pos + n); if (r === 0) break; n += r; if (n === CHUNK) break; }',
    '  if (n === 0) break; const b = buf.subarray(0, n);',
    '  if (kind === "sha256") h.update(b);',
    '  else if (b.equals(zero.subarray(0, n))) h.update("Z" + n);',
    '  else h.update(crypto.createHash("sha256").update(b).digest("hex"));',
    '  pos += n; if (n < CHUNK) break;',
    '}',
    'process.stdout.write(h.digest("hex"));',
  ].join('\n');
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, ['-e', code, file, kind], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (status) => (status === 0 ? resolvePromise(out.trim()) : reject(new Error(`digest of ${file} failed: ${err}`))));
  });
}

/**
 * The digest of the guest disk as QEMU reads it: `qemu-img convert -f <fmt> -O raw` into a sparse
 * temporary file, digested in a child process, then removed.
 */
export async function qemuGuestDigest(file: string, format: string, kind: DigestKind = 'sha256'): Promise<string> {
  const scratch = mkdtempSync(join(tmpdir(), 'imgconv-convert-'));
  const out = join(scratch, 'guest.raw');
  try {
    execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', basename(file), out], { cwd: dirname(file), stdio: ['ignore', 'ignore', 'pipe'] });
    return kind === 'sha256' ? await digestFileInChild(out, kind) : chunkedDigestOfSparseFile(out);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

/**
 * The chunked digest of a sparse file without reading its holes (reading 10 GiB of holes takes
 * ~10 s here): `qemu-img map -f raw` says where data is; chunks with none are all-zero.
 */
function chunkedDigestOfSparseFile(file: string): string {
  const size = statSync(file).size;
  const map = JSON.parse(qemuImg(['map', '--output=json', '-f', 'raw', file])) as { start: number; length: number; data: boolean }[];
  const data = map.filter((e) => e.data).map((e) => [e.start, e.start + e.length] as const);
  const h = createHash('sha256');
  const buf = Buffer.alloc(DIGEST_CHUNK);
  const fd = openSync(file, 'r');
  try {
    for (let pos = 0; pos < size; pos += DIGEST_CHUNK) {
      const n = Math.min(DIGEST_CHUNK, size - pos);
      if (!data.some(([s, e]) => s < pos + n && e > pos)) {
        h.update('Z' + n);
        continue;
      }
      const b = buf.subarray(0, n);
      b.fill(0);
      for (let done = 0; done < n; ) {
        const r = readSync(fd, b, done, n - done, pos + done);
        if (r === 0) break;
        done += r;
      }
      if (b.every((x) => x === 0)) h.update('Z' + n);
      else h.update(createHash('sha256').update(b).digest('hex'));
    }
  } finally {
    closeSync(fd);
  }
  return h.digest('hex');
}
