/**
 * Fully allocated images of random data converted in place by imgconv and copied by
 * `qemu-img convert` to the same target format.
 */
import { join } from 'node:path';
import { allDrivers } from '../drivers/index.js';
import type { ConversionPlan } from '../src/engine/convert.js';
import { type Config, imgconv, journalOf, log, plan, plannedBytes, type TargetResult } from './context.js';
import { copyImage, qemuImg, remove, syncFile, writeRandomRaw } from './images.js';
import { measure, type Measurement } from './measure.js';
import { mmm, MiB, num, sizeLabel, summarize, table } from './stats.js';

export interface DirectionResult {
  size: number;
  from: string;
  to: string;
  plan: ConversionPlan;
  imgconv: Measurement[];
  qemu: Measurement[];
  qemuSync: Measurement[];
  /** qemu-img compare of the source and imgconv's result (first run). */
  identical: boolean;
}

async function direction(cfg: Config, src: string, size: number, from: string, to: string): Promise<DirectionResult> {
  const p = await plan(src, to);
  const res: DirectionResult = { size, from, to, plan: p, imgconv: [], qemu: [], qemuSync: [], identical: false };
  const work = join(cfg.dir, `work.${from}`);
  const out = join(cfg.dir, `out.${to}`);
  for (let r = 0; r < cfg.runs; r++) {
    log(`in place ${sizeLabel(size)} ${from}→${to}: run ${r + 1}/${cfg.runs}`);
    await copyImage(src, work);
    res.imgconv.push(await imgconv(['inplace', work, '--to', to, '--output', 'json'], { watch: [work, journalOf(work)] }));
    if (r === 0) {
      const cmp = await measure('qemu-img', ['compare', '-f', from, '-F', to, src, work], { allowFailure: true });
      res.identical = cmp.exitCode === 0;
    }
    remove(work);
    res.qemu.push(await measure('qemu-img', ['convert', '-f', from, '-O', to, src, out], { watch: [out] }));
    res.qemuSync.push(await measure('sync', [out]));
    remove(out);
  }
  return res;
}

/** The in-place targets this section measures. */
const BENCHMARKED = new Set(['qcow2', 'qed']);

/** Other formats' in-place targets, and what imgconv answers when asked for one. */
async function unavailableTargets(image: string): Promise<string[]> {
  const lines: string[] = [];
  for (const d of allDrivers) {
    if (BENCHMARKED.has(d.name)) continue;
    if (d.target) {
      lines.push(`- **${d.name}**: this build registers an in-place target for it; not benchmarked here (this benchmark covers qcow2 ⇄ QED)`);
      continue;
    }
    const m = await imgconv(['plan', image, '--to', d.name], { allowFailure: true });
    lines.push(`- **${d.name}**: not yet available as an in-place target (\`imgconv plan --to ${d.name}\` exits ${m.exitCode}: "${m.stderr.trim().split('\n')[0]}")`);
  }
  return lines;
}

export async function inplaceSection(cfg: Config): Promise<{ markdown: string; targets: TargetResult[]; results: DirectionResult[] }> {
  const results: DirectionResult[] = [];
  let unavailable: string[] = [];
  for (const size of cfg.inplaceSizes) {
    const raw = join(cfg.dir, 'random.raw');
    const srcQcow2 = join(cfg.dir, 'src.qcow2');
    const srcQed = join(cfg.dir, 'src.qed');
    log(`in place ${sizeLabel(size)}: writing random data, making the qcow2 with qemu-img convert`);
    writeRandomRaw(raw, size);
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, srcQcow2]);
    syncFile(srcQcow2);
    remove(raw);
    if (unavailable.length === 0) unavailable = await unavailableTargets(srcQcow2);
    results.push(await direction(cfg, srcQcow2, size, 'qcow2', 'qed'));
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'qed', srcQcow2, srcQed]);
    syncFile(srcQed);
    remove(srcQcow2);
    results.push(await direction(cfg, srcQed, size, 'qed', 'qcow2'));
    remove(srcQed);
  }

  const s = (ms: Measurement[], f: (m: Measurement) => number, scale: number, d = 2) => mmm(summarize(ms.map(f)), scale, d);
  const rows: string[][] = [];
  for (const r of results) {
    const label = [sizeLabel(r.size), `${r.from} → ${r.to}`];
    rows.push([...label, 'imgconv inplace', s(r.imgconv, (m) => m.wallMs, 1000, 3), '—', s(r.imgconv, (m) => m.writeBytes, MiB), s(r.imgconv, (m) => m.peakRssBytes, MiB, 1), s(r.imgconv, (m) => m.peakExtraSizeBytes, MiB), s(r.imgconv, (m) => m.peakExtraAllocBytes, MiB)]);
    rows.push([...label, 'qemu-img convert', s(r.qemu, (m) => m.wallMs, 1000, 3), s(r.qemuSync, (m) => m.wallMs, 1000, 3), s(r.qemu, (m) => m.writeBytes, MiB), s(r.qemu, (m) => m.peakRssBytes, MiB, 1), s(r.qemu, (m) => m.peakExtraSizeBytes, MiB), s(r.qemu, (m) => m.peakExtraAllocBytes, MiB)]);
  }
  const derived: string[][] = [];
  const targets: TargetResult[] = [];
  const largest = Math.max(...cfg.inplaceSizes);
  for (const r of results) {
    const ours = summarize(r.imgconv.map((m) => m.wallMs)).median;
    const theirs = summarize(r.qemu.map((m) => m.wallMs)).median;
    const theirsDurable = summarize(r.qemu.map((m, i) => m.wallMs + r.qemuSync[i]!.wallMs)).median;
    const written = summarize(r.imgconv.map((m) => m.writeBytes)).median;
    const planned = plannedBytes(r.plan);
    const speedup = theirs / ours;
    const ratio = written / planned;
    derived.push([
      sizeLabel(r.size),
      `${r.from} → ${r.to}`,
      num(speedup, 1),
      num(theirsDurable / ours, 1),
      num(r.plan.metadataBytes / MiB),
      num(r.plan.dataMoveBytes / MiB),
      num(r.plan.compactionMoveBytes / MiB),
      num(written / MiB),
      num(ratio, 3),
      num(r.plan.peakExtraBytes / MiB),
      r.identical ? 'identical' : 'DIFFERENT',
    ]);
    if (r.size === largest) {
      targets.push({
        target: `${sizeLabel(r.size)} ${r.from} → ${r.to} in place ≥ 50× faster than qemu-img convert`,
        measured: `${num(speedup, 1)}× (${num(ours / 1000, 3)} s vs ${num(theirs / 1000, 3)} s, medians)`,
        met: speedup >= 50,
        ...(speedup < 50 ? { shortfall: `${num(50 / speedup, 2)}× short of 50× (imgconv would need ≤ ${num(theirs / 50 / 1000, 3)} s)` } : {}),
      });
      targets.push({
        target: `${sizeLabel(r.size)} ${r.from} → ${r.to} writes ≤ 1.1× the planned bytes (new metadata + moved data + compaction)`,
        measured: `${num(ratio, 3)}× (${num(written / MiB)} MiB written, ${num(planned / MiB)} MiB planned)`,
        met: ratio <= 1.1,
        ...(ratio > 1.1 ? { shortfall: `${num(ratio / 1.1, 2)}× over the 1.1× allowance (${num((written - 1.1 * planned) / MiB)} MiB too many)` } : {}),
      });
    }
  }

  const md = [
    'Fully allocated images of random bytes (crypto.randomBytes; nothing compresses or reads as zero), made by',
    '`qemu-img convert -f raw` from a raw file. The QED source is `qemu-img convert -O qed` of the qcow2 source.',
    'Each run converts a fresh, fsynced `cp` of the source; `qemu-img convert` copies the same source to the',
    'same target format (its defaults: cache=unsafe, so its output is not yet on disk when it exits — the',
    '"then fsync" column is the `sync FILE` that makes it durable; imgconv fsyncs inside its own time).',
    `Figures are median (min–max) over ${cfg.runs} run(s). Written = write_bytes from /proc/<pid>/io; extra = growth of`,
    'the image + journal (imgconv) or of the output file (qemu-img) over the run, apparent size and allocated blocks.',
    '',
    table(['image', 'conversion', 'tool', 'wall s', 'then fsync s', 'written MiB', 'peak RSS MiB', 'peak extra size MiB', 'peak extra allocated MiB'], rows),
    '',
    'Derived (medians). Planned = what `imgconv plan` reports: new metadata, data moved before the commit, and',
    'bytes moved after it to compact the file (QED counts unreferenced space as leaks).',
    '',
    table(['image', 'conversion', 'speed-up vs qemu-img', 'speed-up vs qemu-img + fsync', 'planned metadata MiB', 'planned moved MiB', 'planned compaction MiB', 'written MiB', 'written ÷ planned', 'plan peak extra MiB', 'qemu-img compare'], derived),
    '',
    'Other in-place targets:',
    '',
    ...unavailable,
  ].join('\n');
  return { markdown: md, targets, results };
}
