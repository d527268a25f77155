/** The machine the figures come from. */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { IMGCONV, ROOT } from './context.js';
import { GiB, num } from './stats.js';

function tryRun(cmd: string, args: string[], cwd?: string): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', cwd, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return 'unknown';
  }
}

/** The build measured is the working tree: say when it differs from the commit. */
function uncommitted(): string {
  const out = tryRun('git', ['status', '--porcelain', '--', 'src', 'drivers', 'bin'], ROOT);
  if (out === 'unknown') return 'working tree state unknown';
  const n = out ? out.split('\n').length : 0;
  return n ? `${n} uncommitted change(s) in src/, drivers/, bin/ measured as built` : 'clean working tree';
}

export function machineFacts(dir: string): [string, string][] {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const model = /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? cpus()[0]?.model ?? 'unknown';
  const hypervisor = / hypervisor( |$)/m.test(cpuinfo) ? ' (virtual machine)' : '';
  const fs = tryRun('findmnt', ['-n', '-o', 'FSTYPE,SOURCE,OPTIONS', '-T', dir]);
  return [
    ['CPU', `${model}${hypervisor}`],
    ['cores', String(cpus().length)],
    ['memory', `${num(totalmem() / GiB, 1)} GiB`],
    ['file system (scratch directory)', fs],
    ['kernel', `Linux ${release()}`],
    ['qemu-img', tryRun('qemu-img', ['--version']).split('\n')[0]!],
    ['node', process.version],
    ['imgconv', `${tryRun(process.execPath, [IMGCONV, '--version'])} (commit ${tryRun('git', ['rev-parse', '--short', 'HEAD'], ROOT)}; ${uncommitted()})`],
    ['load average at start (1/5/15 min)', loadavg().map((l) => l.toFixed(2)).join(' / ')],
  ];
}
