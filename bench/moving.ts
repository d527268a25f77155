/**
 * Moving conversions: the data cannot stay where it lies, so imgconv copies it inside the file. Set
 * against `qemu-img convert` to the same target and `cp` of the same source, on the same random data:
 *
 * - a qcow2 with 512-byte clusters holds its data at 512-byte-aligned offsets, between 512-byte L2
 *   tables, so no data cluster is where a QED cluster (≥ 4 KiB) could point: every byte moves;
 * - raw and VHD fixed targets need each guest byte at its own offset (identity placement): a QED's or
 *   qcow2's clusters are relocated there (qcow2 in two steps, through a format that can relocate);
 * - a VHD dynamic block needs a free sector (its bitmap) in front: data without one moves.
 */
import { join } from 'node:path';
import { PHASES } from '../src/engine/convert.js';
import { type Config, log, plannedBytes, type TargetResult } from './context.js';
import { type Conversion, type ConversionResult, measureConversion, median, qemuFormat, throughputs, toolColumns, toolRow } from './conversion.js';
import { qemuImg, remove, syncFile, writeRandomRaw } from './images.js';
import { MiB, num, sizeLabel, summarize, table } from './stats.js';

/** The section's sources: the random raw file, and images `qemu-img convert` makes of it (-o as given). */
const SOURCES = {
  raw: { format: 'raw', make: undefined, words: 'raw' },
  'qcow2-512': { format: 'qcow2', make: 'cluster_size=512', words: 'qcow2 (512-byte clusters)' },
  qcow2: { format: 'qcow2', make: '', words: 'qcow2 (64 KiB clusters)' },
  qed: { format: 'qed', make: '', words: 'QED (64 KiB clusters)' },
} as const;
type SourceName = keyof typeof SOURCES;

/** Each source's conversions, in the order they run (a source is made, measured, then removed). */
const PLAN: readonly { src: SourceName; to: string }[] = [
  { src: 'raw', to: 'vhd' },
  { src: 'qcow2-512', to: 'qed' },
  { src: 'qcow2', to: 'raw' },
  { src: 'qcow2', to: 'vhd' },
  { src: 'qed', to: 'raw' },
];

const conversionOf = (c: (typeof PLAN)[number]): Conversion => ({ from: SOURCES[c.src].format, to: c.to, source: SOURCES[c.src].words });
export const MOVING_CONVERSIONS: readonly Conversion[] = PLAN.map(conversionOf);

/** What the moving section needs on disk: raw + one more source + the copy and its peak growth. */
export function movingSpaceNeeded(bytes: number): number {
  return 6 * bytes;
}

export async function movingSection(cfg: Config): Promise<{ markdown: string; targets: TargetResult[] }> {
  const bytes = cfg.movingBytes;
  const raw = join(cfg.dir, 'moving.raw');
  log(`moving ${sizeLabel(bytes)}: random data`);
  await writeRandomRaw(raw, bytes);
  const results: ConversionResult[] = [];
  for (const name of [...new Set(PLAN.map((c) => c.src))]) {
    const s = SOURCES[name];
    let src = raw;
    if (s.make !== undefined) {
      src = join(cfg.dir, `moving-${name}.${s.format}`);
      log(`moving ${sizeLabel(bytes)}: qemu-img convert → ${s.words}`);
      await qemuImg(['convert', '-f', 'raw', '-O', qemuFormat(s.format), ...(s.make ? ['-o', s.make] : []), raw, src]);
      syncFile(src);
    }
    for (const c of PLAN.filter((c) => c.src === name)) results.push(await measureConversion(cfg, src, conversionOf(c), { tag: 'moving', cp: true, phases: true }));
    if (src !== raw) remove(src);
  }
  remove(raw);

  const rows: string[][] = [];
  const planRows: string[][] = [];
  const phaseRows: string[][] = [];
  const targets: TargetResult[] = [];
  const medThr = (ms: ConversionResult['imgconv'], syncs?: ConversionResult['imgconv']) => summarize(throughputs(ms, bytes, syncs)).median;
  for (const r of results) {
    const p = r.plan;
    rows.push([r.label, `imgconv inplace --to ${r.conv.to}`, ...toolRow(r.imgconv, undefined, bytes)]);
    rows.push([r.label, `qemu-img convert -O ${qemuFormat(r.conv.to)}`, ...toolRow(r.qemu, r.qemuSync, bytes)]);
    rows.push([r.label, 'cp', ...toolRow(r.cp, r.cpSync, bytes)]);
    const written = median(r.imgconv, (m) => m.writeBytes);
    const extraAlloc = median(r.imgconv, (m) => m.peakExtraAllocBytes);
    const cpExtra = median(r.cp, (m) => m.peakExtraAllocBytes);
    const ours = medThr(r.imgconv);
    const theirs = medThr(r.qemu);
    const ratio = ours / theirs;
    const ratioDurable = ours / medThr(r.qemu, r.qemuSync);
    planRows.push([
      r.label,
      p.steps ? `two steps, via ${p.steps[0]!.target.format}` : 'one step',
      num(p.dataMoveBytes / MiB),
      num(p.compactionMoveBytes / MiB),
      num(p.metadataBytes / MiB),
      num(plannedBytes(p) / MiB),
      num(written / MiB),
      num(written / plannedBytes(p), 3),
      num(p.peakExtraBytes / MiB),
      num(median(r.imgconv, (m) => m.peakExtraSizeBytes) / MiB),
      num(extraAlloc / MiB),
      num(cpExtra / MiB),
      num(ratio, 2),
      r.identical ? 'identical' : 'DIFFERENT',
    ]);
    const ph = r.phases!;
    phaseRows.push([r.label, ...PHASES.map((x) => num((ph.phases[x] ?? 0) / 1000, 3)), num(ph.totalMs / 1000, 3), num(ph.maxRssBytes / MiB, 1)]);
    targets.push({
      target: `moving conversion (${sizeLabel(bytes)}, ${r.label}) ≥ 0.8× qemu-img convert's throughput`,
      measured:
        `${num(ratio, 2)}× (${num(ours / MiB, 1)} vs ${num(theirs / MiB, 1)} MiB/s, medians; ${num(ratioDurable, 2)}× once qemu-img's output is fsynced);` +
        ` peak extra space ${num(extraAlloc / MiB)} MiB allocated vs ${num(cpExtra / MiB)} MiB for a copy`,
      met: ratio >= 0.8,
      ...(ratio < 0.8 ? { shortfall: `${num(0.8 / ratio, 2)}× short of 0.8× (${num(ours / MiB, 1)} MiB/s, needs ≥ ${num((0.8 * theirs) / MiB, 1)} MiB/s)` } : {}),
    });
  }

  const md = [
    `${sizeLabel(bytes)} of random bytes (crypto.randomBytes) in a raw file; the other sources are \`qemu-img convert\` of it`,
    '(qcow2 with `-o cluster_size=512` or its default 64 KiB clusters, QED with its default 64 KiB). Each run converts a',
    'fresh, fsynced `cp` of the source in place; `qemu-img convert` writes the same target from the same source (VHD',
    'with `force_size=on`, as imgconv keeps the exact size), and `cp` copies the source. Throughput = guest bytes ÷',
    'wall time; "durable" adds the `sync` of the output (imgconv fsyncs inside its own time). Extra = growth of the',
    'image + journal (imgconv) or of the output (qemu-img, cp) over the run, apparent size and allocated blocks.',
    `Median (min–max) over ${cfg.runs} run(s).`,
    '',
    table(['conversion', 'tool', ...toolColumns(true)], rows),
    '',
    'Plan beside measurement (medians). Planned moved = data copied before the commit (for two steps, both steps',
    'together; the second step is estimated on the view the first leaves); compaction = bytes moved after it;',
    'metadata = new tables and fixed regions. Peak extra: the plan\'s figure for the file\'s growth beyond its',
    'original length, and the largest growth measured (image + journal). qemu-img compare: source vs imgconv\'s result.',
    '',
    table(
      ['conversion', 'route', 'planned moved MiB', 'planned compaction MiB', 'planned metadata MiB', 'planned total MiB', 'written MiB', 'written ÷ planned', 'plan peak extra MiB', 'peak extra size MiB', 'peak extra allocated MiB', 'cp peak extra allocated MiB', 'throughput ÷ qemu-img', 'qemu-img compare'],
      planRows,
    ),
    '',
    'Phases of one more imgconv run per conversion, in process (seconds; see the scale section for what each covers;',
    'a two-step conversion counts each phase from its first event in either step):',
    '',
    table(['conversion', ...PHASES, 'total', 'max RSS MiB'], phaseRows),
  ].join('\n');
  return { markdown: md, targets };
}
