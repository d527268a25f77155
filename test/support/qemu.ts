/**
 * Running the real qemu-img / qemu-io. On CI (or with IMGCONV_REQUIRE_QEMU=1, which the test
 * command sets) a missing qemu-img is a failure, never a skip.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

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
