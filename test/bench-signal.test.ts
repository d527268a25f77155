/**
 * A benchmark stopped by SIGTERM or Ctrl-C (SIGINT) leaves no scratch behind (bench/cleanup.ts): the
 * smoke run is started with --dir (and TMPDIR, where each measured command's own scratch goes) in a
 * fresh directory, signalled once its scratch directory exists, and must exit with 128 + the signal's
 * number, having killed the command it was running, with no `imgconv-bench-*` entry left.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, test } from 'vitest';
import { qemuAvailable } from './support/qemu.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const RUN = join(ROOT, 'dist', 'bench', 'run.js');

/** Builds dist/ when a bench source is newer than its compiled file (or it is missing). */
function buildIfStale(): void {
  const stale = readdirSync(join(ROOT, 'bench'))
    .filter((f) => f.endsWith('.ts'))
    .some((f) => {
      const js = join(ROOT, 'dist', 'bench', f.replace(/\.ts$/, '.js'));
      return !existsSync(js) || statSync(js).mtimeMs < statSync(join(ROOT, 'bench', f)).mtimeMs;
    });
  if (stale) spawnSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.json')], { stdio: 'ignore' });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Direct children of `pid` (every thread's children list). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      for (const k of readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').split(/\s+/)) if (k) out.push(Number(k));
    }
  } catch {
    // gone
  }
  return out;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie is dead; it only waits to be reaped.
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

/** Every process below `pid`. */
function descendantsOf(pid: number): number[] {
  const out: number[] = [];
  for (const c of childrenOf(pid)) out.push(c, ...descendantsOf(c));
  return out;
}

const leftovers = (dir: string) => readdirSync(dir).filter((n) => n.startsWith('imgconv-bench-'));

interface Outcome {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  /** What was there when the signal was sent. */
  scratchAtSignal: string[];
  /** Every process below the bench then. */
  childrenAtSignal: number[];
  left: string[];
}

/**
 * Starts the smoke run in `dir`, waits until `ready` says so (polled every 10 ms, up to a minute), sends
 * `sig`, and waits for the exit (up to a minute; then it is killed and the test fails).
 */
async function stopped(sig: NodeJS.Signals, ready: (dir: string, pid: number) => boolean): Promise<Outcome> {
  const dir = mkdtempSync(join(tmpdir(), 'imgconv-sigtest-'));
  let child: ChildProcess | undefined;
  try {
    child = spawn(process.execPath, [RUN, '--smoke', '--dir', dir, '--out', join(dir, 'report.md')], {
      cwd: ROOT,
      env: { ...process.env, TMPDIR: dir },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) => child!.on('exit', (code, signal) => done({ code, signal })));
    let finished = false;
    void exited.then(() => (finished = true));
    const pid = child.pid!;
    for (let t = Date.now(); !ready(dir, pid); await sleep(10)) {
      if (finished) throw new Error(`the bench ended before it was signalled: ${stderr}`);
      if (Date.now() - t > 60_000) throw new Error(`not ready after a minute: ${stderr}`);
    }
    const scratchAtSignal = leftovers(dir);
    const childrenAtSignal = descendantsOf(pid);
    child.kill(sig);
    const timeout = sleep(60_000).then(() => undefined);
    const r = await Promise.race([exited, timeout]);
    if (!r) throw new Error(`still running a minute after ${sig}: ${stderr}`);
    return { ...r, stderr, scratchAtSignal, childrenAtSignal, left: leftovers(dir) };
  } finally {
    if (child?.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
}

describe.skipIf(!qemuAvailable())('bench stopped by a signal', () => {
  beforeAll(() => {
    buildIfStale();
    expect(existsSync(RUN), `${RUN} missing: build with npx tsc -p .`).toBe(true);
  }, 300_000);

  test('SIGTERM as soon as the scratch directory exists: exit 143, nothing left', async () => {
    const r = await stopped('SIGTERM', (dir) => leftovers(dir).length > 0);
    expect(r.scratchAtSignal.length, r.stderr).toBeGreaterThan(0);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.code, r.stderr).toBe(143);
    expect(r.left, r.stderr).toEqual([]);
  }, 180_000);

  test('SIGINT while a measured command runs: it is killed, exit 130, nothing left', async () => {
    // A command measured under /usr/bin/time (or sh) is running, with its own scratch (imgconv-bench-m-*).
    const r = await stopped('SIGINT', (dir, pid) => leftovers(dir).some((n) => n.startsWith('imgconv-bench-m-')) && childrenOf(pid).length > 0);
    expect(r.childrenAtSignal.length).toBeGreaterThan(0);
    expect(r.scratchAtSignal.length).toBeGreaterThanOrEqual(2);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.code, r.stderr).toBe(130);
    expect(r.left, r.stderr).toEqual([]);
    // The command and everything it started are gone (the harness waited for its process group).
    for (const c of r.childrenAtSignal) expect(alive(c), `process ${c} still running`).toBe(false);
  }, 180_000);
});
