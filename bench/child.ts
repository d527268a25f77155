/**
 * In-process measurements, each run in a child process of its own so the harness's memory and the
 * next run's are unaffected. Prints one JSON object on stdout.
 *
 *   node dist/bench/child.js phases IMAGE TARGET [OPTS]   convert in place (OPTS: the target's -o,
 *                                                   "k=v,k=v"), timing each phase from the engine's own
 *                                                   progress events (ConvertOptions.onProgress)
 *   node dist/bench/child.js layout IMAGE           mapped clusters and discontiguous data runs
 */
import { allDrivers } from '../drivers/index.js';
import { parseTargetOptions } from '../src/cli-options.js';
import { convertInPlace, type Phase } from '../src/engine/convert.js';
import { openImage } from '../src/image.js';

export interface PhaseTimes {
  /** Milliseconds in each phase: from an event of it to the next event of another phase (or the end), summed. */
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

async function phases(image: string, to: string, opts?: string): Promise<PhaseTimes> {
  const t0 = performance.now();
  const out: PhaseTimes['phases'] = {};
  // Time goes to the phase of the last event until an event of another phase (a two-step conversion
  // goes through the phases twice: each phase's figure is the sum over both steps).
  let current: Phase | undefined;
  let since = 0;
  const enter = (phase: Phase | undefined, at: number) => {
    if (current !== undefined) out[current] = (out[current] ?? 0) + at - since;
    current = phase;
    since = at;
  };
  await convertInPlace(image, {
    to,
    options: parseTargetOptions(opts ? [opts] : []),
    drivers: allDrivers,
    onProgress: (e) => {
      if (e.phase !== current) enter(e.phase, performance.now() - t0);
    },
  });
  const totalMs = performance.now() - t0;
  enter(undefined, totalMs);
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
const result = cmd === 'phases' ? await phases(args[0]!, args[1]!, args[2]) : cmd === 'layout' ? await layout(args[0]!) : undefined;
if (result === undefined) {
  process.stderr.write('usage: child.js phases IMAGE TARGET [OPTS] | layout IMAGE\n');
  process.exit(2);
}
process.stdout.write(JSON.stringify(result) + '\n');
