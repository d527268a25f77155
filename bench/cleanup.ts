/**
 * Leaving nothing behind when the benchmark is stopped. The scratch directory holds images of many GiB,
 * so SIGINT (Ctrl-C), SIGTERM and an uncaught error all end the same way: every command still running
 * is killed — each runs in a process group of its own (`/usr/bin/time`, the measuring `sh`, the command
 * and whatever it started), so one kill reaches them all — the harness waits until none of them is left
 * (so nothing writes into the scratch directory any more), removes the scratch directories, and exits
 * with 128 + the signal's number (130, 143), or 1 after an error.
 */
import { spawn, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import { rmSync } from 'node:fs';
import { constants } from 'node:os';
import type { Readable } from 'node:stream';

const children = new Set<ChildProcess>();
const dirs = new Set<string>();
let stopping: string | undefined;

/** Why the harness is stopping (a signal's name or 'error'), or undefined while it runs. */
export function stopReason(): string | undefined {
  return stopping;
}

export class StoppingError extends Error {}

/** Throws once the harness is stopping: nothing new is started, no more scratch data is written. */
export function checkNotStopping(): void {
  if (stopping !== undefined) throw new StoppingError(`bench stopping (${stopping})`);
}

/** A directory removed (recursively) when the harness is stopped; `forget` once it is removed normally. */
export function removeOnStop(dir: string): void {
  dirs.add(dir);
}

export function forget(dir: string): void {
  dirs.delete(dir);
}

/**
 * spawn() with stdout and stderr piped, in a process group of its own (detached: a terminal's Ctrl-C
 * reaches the harness only, which then kills the whole group).
 */
export function spawnTracked(cmd: string, args: string[], opts: { cwd?: string | undefined } = {}): ChildProcessByStdio<null, Readable, Readable> {
  checkNotStopping();
  const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  children.add(child);
  // 'close': the child has exited and every process holding its output pipes (its group) is gone.
  const done = () => children.delete(child);
  child.on('close', done);
  child.on('error', done);
  return child;
}

/** Whether any process of the group `pgid` is still there (zombies included: they are reaped by then). */
function groupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Kills every running command's group, waits (at most `waitMs`) until they are all gone, removes the scratch directories, exits. */
export async function stop(reason: string, exitCode: number, waitMs = 10_000): Promise<never> {
  if (stopping === undefined) {
    stopping = reason;
    const groups = [...children].map((c) => c.pid).filter((p): p is number => p !== undefined);
    for (const pgid of groups) {
      try {
        process.kill(-pgid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    const deadline = Date.now() + waitMs;
    while (groups.some(groupAlive) && Date.now() < deadline) await sleep(20);
    const left = groups.filter(groupAlive);
    if (left.length) process.stderr.write(`bench: process group(s) ${left.join(', ')} still there after ${waitMs} ms; removing the scratch anyway\n`);
    for (const d of dirs) {
      try {
        rmSync(d, { recursive: true, force: true, maxRetries: 3 });
        process.stderr.write(`bench: ${reason}: removed ${d}\n`);
      } catch (e) {
        process.stderr.write(`bench: could not remove ${d}: ${(e as Error).message}\n`);
      }
    }
    // Synchronously after the removal: nothing else runs in between.
    process.exit(exitCode);
  }
  // A second signal or error while stopping: the first one finishes the job.
  return new Promise<never>(() => {});
}

/** SIGINT, SIGTERM and uncaught errors stop the harness as above. */
export function installStopHandlers(): void {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      if (stopping === undefined) process.stderr.write(`bench: ${sig}: stopping, removing the scratch directory\n`);
      void stop(sig, 128 + constants.signals[sig]);
    });
  }
  const fail = (e: unknown) => {
    if (stopping === undefined) process.stderr.write(`bench: ${(e as Error)?.stack ?? e}\n`);
    void stop('error', 1);
  };
  process.on('uncaughtException', fail);
  process.on('unhandledRejection', fail);
}
