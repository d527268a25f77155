/**
 * Running the real qemu-img / qemu-io. On CI (or with IMGCONV_REQUIRE_QEMU=1, which the test
 * command sets) a missing qemu-img is a failure, never a skip.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
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
export function qemuImgStatus(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
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
 * SHA-256 of a file, hashed in a child node process in 4 MiB pieces: memory stays small, and the
 * hashing runs on another core while the caller hashes its own side.
 */
export function sha256FileInChild(file: string): Promise<string> {
  const code = [
    "const fs = require('node:fs'); const h = require('node:crypto').createHash('sha256');",
    'const fd = fs.openSync(process.argv[1], "r"); const buf = Buffer.allocUnsafe(4 << 20); let pos = 0;',
    'for (;;) { const n = fs.readSync(fd, buf, 0, buf.length, pos); if (n === 0) break; h.update(buf.subarray(0, n)); pos += n; }',
    'process.stdout.write(h.digest("hex"));',
  ].join('\n');
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, ['-e', code, file], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolvePromise(out.trim()) : reject(new Error(`sha256 of ${file} failed: ${err}`))));
  });
}

/**
 * SHA-256 of the guest disk as QEMU reads it: `qemu-img convert -f <fmt> -O raw` into a sparse
 * temporary file, hashed as a stream in a child process, then removed.
 */
export async function qemuGuestSha256(file: string, format: string): Promise<string> {
  const scratch = mkdtempSync(join(tmpdir(), 'imgconv-convert-'));
  const out = join(scratch, 'guest.raw');
  try {
    execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', basename(file), out], { cwd: dirname(file), stdio: ['ignore', 'ignore', 'pipe'] });
    return await sha256FileInChild(out);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}
