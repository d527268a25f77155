/**
 * The real CLI as a user runs it (bin/imgconv, which runs the build in dist/): one process per call,
 * exit code and both streams captured. Tests that use it build once first (the test command builds
 * before vitest; a lone `npx vitest run` on a fresh checkout may not have).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export const repoRoot = join(import.meta.dirname, '..', '..');
export const imgconvBin = join(repoRoot, 'bin', 'imgconv');

export function runCli(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [imgconvBin, ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** Builds dist/ when it is missing (for beforeAll). */
export function ensureBuilt(): void {
  if (existsSync(join(repoRoot, 'dist', 'src', 'cli.js'))) return;
  const b = spawnSync('npx', ['tsc', '-p', repoRoot], { encoding: 'utf8' });
  if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
}

/** SHA-256 of a file's bytes, hex: "byte-identical" checks before and after a refusal. */
export function fileSha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}
