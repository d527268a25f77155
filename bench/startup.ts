/** Start-up: how long the CLI takes before it does anything, and for a small `info`. */
import { join } from 'node:path';
import { type Config, imgconv, log } from './context.js';
import { qemuImg, remove } from './images.js';
import { measure, type Measurement } from './measure.js';
import { mmm, MiB, num, summarize, table } from './stats.js';

export async function startupSection(cfg: Config): Promise<{ markdown: string }> {
  const small = join(cfg.dir, 'small.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', small, '64M']);
  await measure('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', small]);
  const cases: [string, () => Promise<Measurement>][] = [
    ['imgconv --version', () => imgconv(['--version'])],
    ['imgconv info (64 MiB qcow2)', () => imgconv(['info', small])],
    ['qemu-img --version (reference)', () => measure('qemu-img', ['--version'])],
    ['qemu-img info (reference)', () => measure('qemu-img', ['info', small])],
  ];
  const rows: string[][] = [];
  for (const [label, fn] of cases) {
    log(`start-up: ${label} × ${cfg.startupRuns}`);
    await fn(); // warm the page cache: every measured run starts from the same state
    const ms: Measurement[] = [];
    for (let i = 0; i < cfg.startupRuns; i++) ms.push(await fn());
    const wall = summarize(ms.map((m) => m.wallMs));
    rows.push([label, num(wall.median, 1), num(wall.min, 1), num(wall.max, 1), mmm(summarize(ms.map((m) => m.peakRssBytes)), MiB, 1)]);
  }
  remove(small);
  const md = [
    `Wall time of ${cfg.startupRuns} run(s) after one unmeasured warm-up run (page cache warm).`,
    '',
    table(['command', 'median ms', 'min ms', 'max ms', 'peak RSS MiB'], rows),
  ].join('\n');
  return { markdown: md };
}
