/**
 * imgconv's benchmark: `npm run bench` writes BENCHMARKS.md; `npm run bench:smoke` (--smoke) runs
 * every section on tiny images once, in seconds, and writes the report to a temporary file whose path
 * it prints. Options: --out FILE, --dir DIR (scratch parent; default the OS temp dir), --runs N,
 * --only startup,inplace,scale,moving, and the image sizes (e.g. 64M, 1G, 1T): --sizes LIST (in-place
 * section), --scale-sizes LIST, --moving-size SIZE.
 *
 * Stopped by SIGINT (Ctrl-C) or SIGTERM, or by an uncaught error, it kills the command it is running and
 * removes its scratch directory before it exits (130, 143 or 1): bench/cleanup.ts.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { installStopHandlers, removeOnStop, stop, stopReason } from './cleanup.js';
import { type Config, HEADINGS, log, ROOT, SECTION_NAMES, type SectionName, type TargetResult } from './context.js';
import { freeBytes } from './images.js';
import { inplaceSection } from './inplace.js';
import { machineFacts } from './machine.js';
import { hasGnuTime } from './measure.js';
import { movingSection, movingSpaceNeeded } from './moving.js';
import { scaleSection } from './scale.js';
import { startupSection } from './startup.js';
import { GiB, MiB, TiB, table } from './stats.js';

/** "512M", "8G", "1T" or a byte count. */
function parseSize(flag: string, v: string): number {
  const m = /^(\d+)([KMGT]?)(?:i?B)?$/i.exec(v.trim());
  if (!m) throw new Error(`${flag}: ${v} is not a size (e.g. 64M, 1G)`);
  const unit = { '': 1, K: 1024, M: MiB, G: GiB, T: TiB }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const bytes = Number(m[1]) * unit;
  if (bytes <= 0 || bytes % MiB !== 0) throw new Error(`${flag}: ${v} must be a positive number of whole MiB`);
  return bytes;
}

function parseArgs(argv: string[]): Config {
  const smoke = argv.includes('--smoke');
  const value = (flag: string) => {
    const i = argv.indexOf(flag);
    if (i < 0) return undefined;
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`${flag} needs a value`);
    return v;
  };
  const only = value('--only');
  const sections = new Set<SectionName>(only ? (only.split(',') as SectionName[]) : SECTION_NAMES);
  for (const s of sections) if (!SECTION_NAMES.includes(s)) throw new Error(`--only: unknown section ${s} (known: ${SECTION_NAMES.join(', ')})`);
  const runs = Number(value('--runs') ?? (smoke ? 1 : 3));
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs must be a positive integer');
  const parent = value('--dir') ?? tmpdir();
  const sizes = (flag: string) => value(flag)?.split(',').map((v) => parseSize(flag, v));
  const movingSize = value('--moving-size');
  // Every option is read before the scratch directory is made: a bad one leaves nothing behind.
  const inplaceSizes = sizes('--sizes') ?? (smoke ? [8 * MiB] : [1 * GiB, 4 * GiB, 8 * GiB]);
  const scaleSizes = sizes('--scale-sizes') ?? (smoke ? [256 * MiB, 1 * GiB] : [64 * GiB, 256 * GiB, 1 * TiB]);
  const movingBytes = movingSize !== undefined ? parseSize('--moving-size', movingSize) : smoke ? 4 * MiB : 1 * GiB;
  return {
    smoke,
    out: value('--out') ?? (smoke ? join(tmpdir(), `imgconv-bench-smoke-${process.pid}.md`) : join(ROOT, 'BENCHMARKS.md')),
    dir: mkdtempSync(join(parent, 'imgconv-bench-')),
    runs,
    inplaceSizes,
    scaleSizes,
    movingBytes,
    startupRuns: smoke ? 1 : 10,
    sections,
  };
}

const METHOD = [
  '- Every command runs under `sh`, which reads a nanosecond clock just before starting it and just after reaping',
  '  it (wall time), then copies its own `/proc/<pid>/io`: Linux adds a reaped child\'s I/O counters to its parent\'s,',
  '  so the shell\'s `write_bytes` are the command\'s own — every thread and descendant — counted when pages are',
  '  dirtied, not as the tool reports them.',
  '- Peak RSS is `ru_maxrss` of the process tree from `/usr/bin/time -f %M`' + (hasGnuTime ? '' : ' (absent here: VmHWM polled instead)') + '; the harness also polls VmHWM',
  '  of every process below the shell every 5 ms, the figure used where /usr/bin/time is missing.',
  '- Peak extra disk space: the harness polls size and allocated blocks of the files a command grows (image +',
  '  `.imgconv-journal` + the companion file a conversion creates beside the image, or every output file) every 5 ms',
  '  and keeps the largest growth; the plan\'s own figure is beside it.',
  '- Every image a run converts is a fresh copy, fsynced before the run, so no run waits for or hides another\'s',
  '  writeback. The page cache is warm (the copy was just written); caches are not dropped.',
  '- Figures are median (min–max) over the stated number of runs.',
  '- `write_bytes` counts page-cache folios as they are dirtied. On this kernel ext4 caches files in large folios, so',
  '  a small write into a folio that a flush has just cleaned (the 8-byte pointer updates of compaction, a table entry)',
  '  counts the whole folio, as large as the write that filled it (a 1 MiB pwrite, fdatasync, then an 8-byte pwrite',
  '  into it: 1 MiB counted). Small metadata writes therefore read higher than the bytes passed to write().',
  '  The journal (`.imgconv-journal`: undo and redo copies of the fixed regions) is included; it is not in the plan.',
  '- The machine may be shared with other work: see the load averages in the Machine table. Wall times on a loaded',
  '  machine include waiting for a CPU; node\'s own start-up (`node -e 0`) is part of every imgconv figure.',
];

async function main(): Promise<void> {
  // SIGINT/SIGTERM or an uncaught error: the running command is killed and the scratch removed (cleanup.ts).
  installStopHandlers();
  const cfg = parseArgs(process.argv.slice(2));
  removeOnStop(cfg.dir);
  const needed = Math.max(
    cfg.sections.has('inplace') ? 2 * Math.max(...cfg.inplaceSizes) + GiB : GiB,
    cfg.sections.has('moving') ? movingSpaceNeeded(cfg.movingBytes) : 0,
  );
  const started = new Date();
  const parts: string[] = [];
  const targets: TargetResult[] = [];
  const notRun = '_Not run in this report._';
  try {
    if (freeBytes(cfg.dir) < needed) throw new Error(`${cfg.dir}: ${freeBytes(cfg.dir)} bytes free, the benchmark needs ${needed}`);
    const machine = machineFacts(cfg.dir);
    const sectionText: Partial<Record<SectionName, string>> = {};
    if (cfg.sections.has('startup')) sectionText.startup = (await startupSection(cfg)).markdown;
    if (cfg.sections.has('inplace')) {
      const r = await inplaceSection(cfg);
      sectionText.inplace = r.markdown;
      targets.push(...r.targets);
    }
    if (cfg.sections.has('scale')) {
      const r = await scaleSection(cfg);
      sectionText.scale = r.markdown;
      targets.push(...r.targets);
    }
    if (cfg.sections.has('moving')) {
      const r = await movingSection(cfg);
      sectionText.moving = r.markdown;
      targets.push(...r.targets);
    }
    const minutes = (Date.now() - started.getTime()) / 60000;
    machine.push(['load average at end (1/5/15 min)', loadavg().map((l) => l.toFixed(2)).join(' / ')]);
    parts.push(
      '# imgconv benchmarks',
      '',
      `Written by \`${cfg.smoke ? 'npm run bench:smoke' : 'npm run bench'}\` on ${started.toISOString().slice(0, 16).replace('T', ' ')} UTC in ${minutes.toFixed(1)} minutes.` +
        (cfg.smoke ? ' SMOKE RUN: tiny images, one run each — these numbers say nothing about performance.' : ''),
      'Targets are reported against, never asserted; the last section lists each with the shortfall where one is missed.',
      '',
      HEADINGS.machine,
      '',
      table(['', ''], machine),
      '',
      HEADINGS.method,
      '',
      ...METHOD,
      '',
    );
    for (const s of SECTION_NAMES) parts.push(HEADINGS[s], '', sectionText[s] ?? notRun, '');
    parts.push(
      HEADINGS.targets,
      '',
      targets.length
        ? table(['target', 'measured', 'met', 'shortfall'], targets.map((t) => [t.target, t.measured, t.met ? 'yes' : 'no', t.met ? '—' : t.shortfall ?? 'missed']))
        : notRun,
      '',
    );
    writeFileSync(cfg.out, parts.join('\n'));
    log(`report written to ${cfg.out}`);
    process.stdout.write(cfg.out + '\n');
  } finally {
    rmSync(cfg.dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  // Stopping on a signal fails whatever was running; the stop handler exits with the signal's code.
  if (stopReason() !== undefined) return;
  process.stderr.write(`bench: ${(e as Error).stack ?? e}\n`);
  void stop('error', 1);
});
