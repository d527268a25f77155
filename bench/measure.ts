/**
 * Running one command and measuring it from the outside, so that no number is self-reported:
 *
 * - The command runs under `sh`, which records a nanosecond clock just before forking it and just
 *   after reaping it (wall time without Node's spawn overhead), then copies its own /proc/<pid>/io.
 *   Linux adds a reaped child's I/O counters into the parent's (wait_task_zombie), so the shell's
 *   write_bytes after the wait are the command's — all its threads and descendants — exactly the bytes
 *   it caused to be written to the file system (pages it dirtied, counted when dirtied).
 * - Peak RSS is ru_maxrss of the waited-for process tree, taken by `/usr/bin/time -f %M` when present.
 *   The harness also polls VmHWM of every process below the shell every few milliseconds: the figure
 *   used when /usr/bin/time is missing (kept in polledRssBytes either way).
 * - Disk space: the harness polls the size and allocated blocks of the files the command may grow
 *   (the image and its journal, or the output file) and keeps the largest growth over the start.
 *   The poll can miss a peak shorter than its interval; the plan's own peakExtraBytes is reported beside.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { forget, removeOnStop, spawnTracked } from './cleanup.js';

export const TIME_BIN = '/usr/bin/time';
export const hasGnuTime = existsSync(TIME_BIN);

export interface Measurement {
  /** Wall time of the command alone, from the shell's clock. */
  wallMs: number;
  /** write_bytes from /proc/<pid>/io: bytes the command caused to be written to storage. */
  writeBytes: number;
  /** cancelled_write_bytes: dirtied pages later truncated or punched away before writeback. */
  cancelledWriteBytes: number;
  /** rchar/wchar: bytes passed through read/write syscalls (cache hits included). */
  readChars: number;
  writeChars: number;
  /** Peak resident set size in bytes: ru_maxrss from /usr/bin/time, else the VmHWM poll. */
  peakRssBytes: number;
  /** The VmHWM poll on its own (0 when the command ended before the first sample). */
  polledRssBytes: number;
  rssSource: 'ru_maxrss' | 'VmHWM poll';
  /** Largest growth of the watched files' apparent size (sum) and allocated bytes (sum). */
  peakExtraSizeBytes: number;
  peakExtraAllocBytes: number;
  /** Growth of the same sums at the end. */
  finalExtraSizeBytes: number;
  finalExtraAllocBytes: number;
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface MeasureOptions {
  /** Files whose size and allocation growth is tracked; they need not exist yet. */
  watch?: string[];
  cwd?: string;
  /** Poll interval in ms (default 5). */
  pollMs?: number;
  /** Use the VmHWM poll even when /usr/bin/time exists (exercises the fallback). */
  forcePoll?: boolean;
  /** A non-zero exit is an error unless this is set. */
  allowFailure?: boolean;
}

function fileUsage(paths: string[]): { size: number; alloc: number } {
  let size = 0;
  let alloc = 0;
  for (const p of paths) {
    try {
      const s = statSync(p);
      size += s.size;
      alloc += s.blocks * 512;
    } catch {
      // not there (yet, or any more): contributes nothing
    }
  }
  return { size, alloc };
}

/** Every pid below `root` (children lists from /proc/<pid>/task/<tid>/children). */
function descendants(root: number): number[] {
  const out: number[] = [];
  const queue = [root];
  while (queue.length) {
    const pid = queue.shift()!;
    let tasks: string[];
    try {
      tasks = readdirSync(`/proc/${pid}/task`);
    } catch {
      continue;
    }
    for (const tid of tasks) {
      let kids = '';
      try {
        kids = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const k of kids.split(/\s+/)) if (k) {
        out.push(Number(k));
        queue.push(Number(k));
      }
    }
  }
  return out;
}

function vmHwmBytes(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

function parseIo(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split('\n')) {
    const m = /^(\w+):?\s+(-?\d+)$/.exec(line.trim());
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

// $1: where to write the clock and the io counters; the rest is the command.
const WRAPPER = 'out="$1"; shift; s=$(date +%s%N); "$@"; rc=$?; e=$(date +%s%N); { echo "start $s"; echo "end $e"; cat /proc/$$/io; } > "$out"; exit $rc';

export async function measure(cmd: string, args: string[], opts: MeasureOptions = {}): Promise<Measurement> {
  const scratch = mkdtempSync(join(tmpdir(), 'imgconv-bench-m-'));
  removeOnStop(scratch);
  const ioFile = join(scratch, 'io');
  const rssFile = join(scratch, 'rss');
  const watch = opts.watch ?? [];
  const useTime = hasGnuTime && !opts.forcePoll;
  const shArgs = ['-c', WRAPPER, 'sh', ioFile, cmd, ...args];
  const [bin, binArgs] = useTime ? [TIME_BIN, ['-f', '%M', '-o', rssFile, 'sh', ...shArgs]] : ['sh', shArgs];
  const base = fileUsage(watch);
  let peakSize = 0;
  let peakAlloc = 0;
  let polledRss = 0;
  try {
    const child = spawnTracked(bin, binArgs, { cwd: opts.cwd });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const sample = () => {
      const u = fileUsage(watch);
      peakSize = Math.max(peakSize, u.size - base.size);
      peakAlloc = Math.max(peakAlloc, u.alloc - base.alloc);
      if (child.pid !== undefined) for (const pid of descendants(child.pid)) polledRss = Math.max(polledRss, vmHwmBytes(pid));
    };
    const timer = setInterval(sample, opts.pollMs ?? 5);
    const exitCode = await new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code) => resolve(code ?? -1));
    });
    clearInterval(timer);
    sample();
    const end = fileUsage(watch);
    if (exitCode !== 0 && !opts.allowFailure) {
      throw new Error(`${cmd} ${args.join(' ')} exited with ${exitCode}: ${stderr.trim().slice(0, 2000)}`);
    }
    const ioText = readFileSync(ioFile, 'utf8');
    const io = parseIo(ioText);
    const start = /start (\d+)/.exec(ioText);
    const stop = /end (\d+)/.exec(ioText);
    if (!start || !stop || io.write_bytes === undefined) throw new Error(`measurement wrapper wrote no counters for ${cmd}: ${ioText}`);
    const wallMs = Number(BigInt(stop[1]!) - BigInt(start[1]!)) / 1e6;
    let peakRss = polledRss;
    let rssSource: Measurement['rssSource'] = 'VmHWM poll';
    if (useTime) {
      const kib = Number(readFileSync(rssFile, 'utf8').trim().split('\n').pop());
      if (!Number.isFinite(kib)) throw new Error(`/usr/bin/time wrote no max RSS for ${cmd}`);
      peakRss = kib * 1024;
      rssSource = 'ru_maxrss';
    }
    return {
      wallMs,
      writeBytes: io.write_bytes,
      cancelledWriteBytes: io.cancelled_write_bytes ?? 0,
      readChars: io.rchar ?? 0,
      writeChars: io.wchar ?? 0,
      peakRssBytes: peakRss,
      polledRssBytes: polledRss,
      rssSource,
      peakExtraSizeBytes: peakSize,
      peakExtraAllocBytes: peakAlloc,
      finalExtraSizeBytes: end.size - base.size,
      finalExtraAllocBytes: end.alloc - base.alloc,
      exitCode,
      stdout,
      stderr,
    };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
    forget(scratch);
  }
}

/** Runs a command to completion (not measured); returns stdout. */
export function run(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawnTracked(cmd, args, { cwd: opts.cwd });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${stderr.trim().slice(0, 2000)}`))));
  });
}
