/**
 * In-process measurements, each run in a child process of its own so the harness's memory and the
 * next run's are unaffected. Prints one JSON object on stdout.
 *
 *   node dist/bench/child.js phases IMAGE TARGET   convert in place, timing each phase from the
 *                                                   engine's own progress events (ConvertOptions.onProgress)
 *   node dist/bench/child.js layout IMAGE           mapped clusters and discontiguous data runs
 */
import { allDrivers } from '../drivers/index.js';
import { convertInPlace, type Phase } from '../src/engine/convert.js';
import { openImage } from '../src/image.js';

export interface PhaseTimes {
  /** Milliseconds from the first event of each phase to the first event of the next (or the end). */
  phases: Partial<Record<Phase, number>>;
  totalMs: number;
  maxRssBytes: number;
}

export interface LayoutStats {
  format: string;
  virtualSize: number;
  clusterSize: number;
  /** Guest bytes mapped to data in this layer, in clusters. */
  dataClusters: number;
  /** Data runs after merging those whose host side continues: the discontiguous runs. */
  dataRuns: number;
  /** All runs of the mapping (data, zero, unallocated). */
  runs: number;
}

async function phases(image: string, to: string): Promise<PhaseTimes> {
  const t0 = performance.now();
  const firsts: [Phase, number][] = [];
  await convertInPlace(image, {
    to,
    drivers: allDrivers,
    onProgress: (e) => {
      if (!firsts.some(([p]) => p === e.phase)) firsts.push([e.phase, performance.now() - t0]);
    },
  });
  const totalMs = performance.now() - t0;
  const out: PhaseTimes['phases'] = {};
  firsts.forEach(([p, at], i) => (out[p] = (firsts[i + 1]?.[1] ?? totalMs) - at));
  return { phases: out, totalMs, maxRssBytes: process.resourceUsage().maxRSS * 1024 };
}

async function layout(image: string): Promise<LayoutStats> {
  const chain = await openImage(image, { drivers: allDrivers, backing: false });
  try {
    const img = chain.layers[0]!;
    const map = await img.mapping();
    const cs = img.info.clusterSize ?? 512;
    let dataBytes = 0;
    let dataRuns = 0;
    for (const e of map) {
      if (e.kind !== 'data') continue;
      dataBytes += e.length;
      dataRuns++;
    }
    return { format: img.info.format, virtualSize: img.info.virtualSize, clusterSize: cs, dataClusters: Math.ceil(dataBytes / cs), dataRuns, runs: map.count };
  } finally {
    await chain.close();
  }
}

const [cmd, ...args] = process.argv.slice(2);
const result = cmd === 'phases' ? await phases(args[0]!, args[1]!) : cmd === 'layout' ? await layout(args[0]!) : undefined;
if (result === undefined) {
  process.stderr.write('usage: child.js phases IMAGE TARGET | layout IMAGE\n');
  process.exit(2);
}
process.stdout.write(JSON.stringify(result) + '\n');
