/**
 * Moving conversions: a qcow2 with 512-byte clusters holds its data at 512-byte-aligned offsets,
 * between 512-byte L2 tables, so no data cluster is where a QED cluster (≥ 4 KiB) could point: every
 * byte must move. imgconv's throughput is set against `qemu-img convert` and `cp` of the same image.
 */
import { join } from 'node:path';
import type { PhaseTimes } from './child.js';
import { type Config, imgconv, journalOf, log, phaseTimes, plan, plannedBytes, type TargetResult } from './context.js';
import { copyImage, qemuImg, remove, syncFile, writeRandomRaw } from './images.js';
import { measure, type Measurement } from './measure.js';
import { mmm, MiB, num, sizeLabel, summarize, table } from './stats.js';
import { PHASES } from '../src/engine/convert.js';

export async function movingSection(cfg: Config): Promise<{ markdown: string; targets: TargetResult[] }> {
  const bytes = cfg.movingBytes;
  const raw = join(cfg.dir, 'moving.raw');
  const src = join(cfg.dir, 'moving.qcow2');
  const work = join(cfg.dir, 'moving-work.qcow2');
  const out = join(cfg.dir, 'moving-out.qed');
  const copy = join(cfg.dir, 'moving-copy.qcow2');
  log(`moving ${sizeLabel(bytes)}: random data into a qcow2 with 512-byte clusters`);
  writeRandomRaw(raw, bytes);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, src]);
  syncFile(src);
  remove(raw);
  const p = await plan(src, 'qed');

  const ours: Measurement[] = [];
  const qemu: Measurement[] = [];
  const qemuSync: Measurement[] = [];
  const cp: Measurement[] = [];
  const cpSync: Measurement[] = [];
  let identical = false;
  for (let r = 0; r < cfg.runs; r++) {
    log(`moving ${sizeLabel(bytes)}: run ${r + 1}/${cfg.runs}`);
    await copyImage(src, work);
    ours.push(await imgconv(['inplace', work, '--to', 'qed', '--output', 'json'], { watch: [work, journalOf(work)] }));
    if (r === 0) identical = (await measure('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qed', src, work], { allowFailure: true })).exitCode === 0;
    remove(work);
    qemu.push(await measure('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qed', src, out], { watch: [out] }));
    qemuSync.push(await measure('sync', [out]));
    remove(out);
    cp.push(await measure('cp', [src, copy], { watch: [copy] }));
    cpSync.push(await measure('sync', [copy]));
    remove(copy);
  }
  log(`moving ${sizeLabel(bytes)}: one more run timing the phases in process`);
  await copyImage(src, work);
  const phases: PhaseTimes = await phaseTimes(work, 'qed');
  remove(work, src);

  const s = (ms: Measurement[], f: (m: Measurement) => number, scale: number, d = 2) => mmm(summarize(ms.map(f)), scale, d);
  const thr = (ms: Measurement[], syncs?: Measurement[]) => mmm(summarize(ms.map((m, i) => bytes / MiB / ((m.wallMs + (syncs?.[i]?.wallMs ?? 0)) / 1000))), 1, 1);
  const row = (tool: string, ms: Measurement[], syncs?: Measurement[]) => [
    tool,
    s(ms, (m) => m.wallMs, 1000, 3),
    syncs ? s(syncs, (m) => m.wallMs, 1000, 3) : '—',
    thr(ms),
    thr(ms, syncs),
    s(ms, (m) => m.writeBytes, MiB),
    s(ms, (m) => m.peakRssBytes, MiB, 1),
    s(ms, (m) => m.peakExtraSizeBytes, MiB),
    s(ms, (m) => m.peakExtraAllocBytes, MiB),
  ];
  const rows = [row('imgconv inplace --to qed', ours), row('qemu-img convert -O qed', qemu, qemuSync), row('cp', cp, cpSync)];

  const medThr = (ms: Measurement[], syncs?: Measurement[]) => summarize(ms.map((m, i) => bytes / ((m.wallMs + (syncs?.[i]?.wallMs ?? 0)) / 1000))).median;
  const ratio = medThr(ours) / medThr(qemu);
  const ratioDurable = medThr(ours) / medThr(qemu, qemuSync);
  const targets: TargetResult[] = [
    {
      target: `moving conversion (${sizeLabel(bytes)} in 512-byte qcow2 clusters → QED) ≥ 0.8× qemu-img convert's throughput`,
      measured: `${num(ratio, 2)}× (${num(medThr(ours) / MiB, 1)} vs ${num(medThr(qemu) / MiB, 1)} MiB/s, medians; ${num(ratioDurable, 2)}× once qemu-img's output is fsynced)`,
      met: ratio >= 0.8,
      ...(ratio < 0.8 ? { shortfall: `${num(0.8 / ratio, 2)}× short of 0.8× (${num(medThr(ours) / MiB, 1)} MiB/s, needs ≥ ${num((0.8 * medThr(qemu)) / MiB, 1)} MiB/s)` } : {}),
    },
  ];
  const written = summarize(ours.map((m) => m.writeBytes)).median;

  const md = [
    `${sizeLabel(bytes)} of random bytes written by \`qemu-img convert -O qcow2 -o cluster_size=512\` from a raw file.`,
    `The plan moves ${num(p.dataMoveBytes / MiB)} MiB before the commit (${[...new Set(p.moves.map((m) => m.reason))].join('; ') || 'no reason given'})`,
    `and ${num(p.compactionMoveBytes / MiB)} MiB after it to compact; ${num(p.metadataBytes / MiB)} MiB of new metadata; plan peak extra space`,
    `${num(p.peakExtraBytes / MiB)} MiB. imgconv wrote ${num(written / MiB)} MiB (median), ${num(written / plannedBytes(p), 3)}× the planned`,
    `${num(plannedBytes(p) / MiB)} MiB. qemu-img compare of source and result: ${identical ? 'identical' : 'DIFFERENT'}.`,
    `Throughput = ${sizeLabel(bytes)} of guest data ÷ wall time; "durable" adds the fsync of the output (imgconv fsyncs`,
    `inside its own time). Median (min–max) over ${cfg.runs} run(s).`,
    '',
    table(['tool', 'wall s', 'then fsync s', 'throughput MiB/s', 'durable throughput MiB/s', 'written MiB', 'peak RSS MiB', 'peak extra size MiB', 'peak extra allocated MiB'], rows),
    '',
    'Phases of one more imgconv run, in process (seconds; see the scale section for what each covers):',
    '',
    table([...PHASES, 'total', 'max RSS MiB'], [[...PHASES.map((ph) => num((phases.phases[ph] ?? 0) / 1000, 3)), num(phases.totalMs / 1000, 3), num(phases.maxRssBytes / MiB, 1)]]),
  ].join('\n');
  return { markdown: md, targets };
}
