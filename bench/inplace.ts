/**
 * Fully allocated images of random data converted in place by imgconv and copied by
 * `qemu-img convert` to the same target (format and subformat).
 */
import { join } from 'node:path';
import { allDrivers } from '../drivers/index.js';
import { type Config, imgconv, log, plannedBytes, type TargetResult } from './context.js';
import { type Conversion, conversionLabel, type ConversionResult, measureConversion, median, qemuFormat, toolColumns, toolRow } from './conversion.js';
import { qemuImg, remove, syncFile, writeRandomRaw } from './images.js';
import { MOVING_CONVERSIONS } from './moving.js';
import { KiB, MiB, num, sizeLabel, summarize, table } from './stats.js';

/**
 * What this section converts. Every source holds the same random data, and they are made in the order
 * of first appearance here, each from the one before by `qemu-img convert` (raw → qcow2 → QED), which
 * then goes: the raw file itself first (the zero-copy targets: the data stays where it lies and becomes
 * the new image's data file or body). One source at a time plus one copy or output: the section needs
 * twice the largest size in free space.
 */
export const INPLACE_CONVERSIONS: readonly Conversion[] = [
  { from: 'raw', to: 'vhd', options: { subformat: 'fixed' } },
  { from: 'raw', to: 'vmdk', options: { subformat: 'monolithicFlat' } },
  { from: 'raw', to: 'qcow2', options: { data_file_raw: 'on' } },
  { from: 'qcow2', to: 'qed' },
  { from: 'qcow2', to: 'vmdk' },
  { from: 'qed', to: 'qcow2' },
  { from: 'qed', to: 'vmdk' },
];

export interface DirectionResult extends ConversionResult {
  size: number;
}

/** Small amounts in KiB, others in MiB (a zero-copy conversion plans a few hundred bytes). */
function bytesLabel(b: number): string {
  return Math.abs(b) < MiB ? `${num(b / KiB, 1)} KiB` : `${num(b / MiB)} MiB`;
}

/**
 * Every format of the driver registry: which conversions into it this benchmark measures (this section
 * and the moving one), or why none.
 */
async function targetCoverage(image: string): Promise<string[]> {
  const measured = new Map<string, string[]>();
  const add = (section: string, cs: readonly Conversion[]) => {
    for (const c of cs) measured.set(c.to, [...(measured.get(c.to) ?? []), `${conversionLabel(c)} (${section})`]);
  };
  add('in place', INPLACE_CONVERSIONS);
  add('moving', MOVING_CONVERSIONS);
  const lines: string[] = [];
  for (const d of allDrivers) {
    const where = measured.get(d.name);
    if (d.target && where) {
      lines.push(`- **${d.name}**: measured: ${where.join('; ')}`);
    } else if (d.target) {
      lines.push(`- **${d.name}**: this build registers an in-place target for it, but no section of this benchmark converts to it`);
    } else {
      const m = await imgconv(['plan', image, '--to', d.name], { allowFailure: true });
      lines.push(`- **${d.name}**: not an in-place target in this build (\`imgconv plan --to ${d.name}\` exits ${m.exitCode}: "${m.stderr.trim().split('\n')[0]}")`);
    }
  }
  return lines;
}

export async function inplaceSection(cfg: Config): Promise<{ markdown: string; targets: TargetResult[]; results: DirectionResult[] }> {
  const sources = [...new Set(INPLACE_CONVERSIONS.map((c) => c.from))];
  if (sources[0] !== 'raw') throw new Error('the in-place conversions must start with the raw source');
  const results: DirectionResult[] = [];
  let coverage: string[] | undefined;
  for (const size of cfg.inplaceSizes) {
    log(`in place ${sizeLabel(size)}: writing random data`);
    let src = join(cfg.dir, 'src.raw');
    await writeRandomRaw(src, size);
    coverage ??= await targetCoverage(src);
    for (const [i, from] of sources.entries()) {
      if (i > 0) {
        const prev = src;
        src = join(cfg.dir, `src.${from}`);
        log(`in place ${sizeLabel(size)}: qemu-img convert ${sources[i - 1]} → ${from}`);
        await qemuImg(['convert', '-f', qemuFormat(sources[i - 1]!), '-O', qemuFormat(from), prev, src]);
        syncFile(src);
        remove(prev);
      }
      for (const c of INPLACE_CONVERSIONS.filter((c) => c.from === from)) {
        results.push({ size, ...(await measureConversion(cfg, src, c, { tag: 'inplace', logAs: `in place ${sizeLabel(size)}` })) });
      }
    }
    remove(src);
  }

  const rows: string[][] = [];
  for (const r of results) {
    rows.push([sizeLabel(r.size), r.label, 'imgconv inplace', ...toolRow(r.imgconv, undefined)]);
    rows.push([sizeLabel(r.size), r.label, 'qemu-img convert', ...toolRow(r.qemu, r.qemuSync)]);
  }
  const derived: string[][] = [];
  const targets: TargetResult[] = [];
  const largest = Math.max(...cfg.inplaceSizes);
  for (const r of results) {
    const ours = median(r.imgconv, (m) => m.wallMs);
    const theirs = median(r.qemu, (m) => m.wallMs);
    const theirsDurable = summarize(r.qemu.map((m, i) => m.wallMs + r.qemuSync[i]!.wallMs)).median;
    const written = median(r.imgconv, (m) => m.writeBytes);
    const planned = plannedBytes(r.plan);
    const speedup = theirs / ours;
    const ratio = written / planned;
    derived.push([
      sizeLabel(r.size),
      r.label,
      num(speedup, 1),
      num(theirsDurable / ours, 1),
      num(r.plan.metadataBytes / KiB, 1),
      num(r.plan.dataMoveBytes / MiB),
      num(r.plan.compactionMoveBytes / MiB),
      num(written / KiB, 1),
      num(ratio, 3),
      num(r.plan.peakExtraBytes / MiB),
      r.identical ? 'identical' : 'DIFFERENT',
    ]);
    if (r.size === largest) {
      targets.push({
        target: `${sizeLabel(r.size)} ${r.label} in place ≥ 50× faster than qemu-img convert`,
        measured: `${num(speedup, 1)}× (${num(ours / 1000, 3)} s vs ${num(theirs / 1000, 3)} s, medians)`,
        met: speedup >= 50,
        ...(speedup < 50 ? { shortfall: `${num(50 / speedup, 2)}× short of 50× (imgconv would need ≤ ${num(theirs / 50 / 1000, 3)} s)` } : {}),
      });
      targets.push({
        target: `${sizeLabel(r.size)} ${r.label} writes ≤ 1.1× the planned bytes (new metadata + moved data + compaction)`,
        measured: `${num(ratio, 3)}× (${bytesLabel(written)} written, ${bytesLabel(planned)} planned)`,
        met: ratio <= 1.1,
        ...(ratio > 1.1 ? { shortfall: `${num(ratio / 1.1, 2)}× over the 1.1× allowance (${bytesLabel(written - 1.1 * planned)} too many)` } : {}),
      });
    }
  }

  const md = [
    'Fully allocated images of random bytes (crypto.randomBytes; nothing compresses or reads as zero). The raw',
    'file itself is the source of the zero-copy conversions (its bytes stay where they are and become the data of',
    'a VHD fixed, of a VMDK monolithicFlat extent behind a new descriptor, or of a qcow2 with a raw external data',
    'file beside a new metadata file). The qcow2 source is `qemu-img convert -O qcow2` of the raw file (64 KiB',
    'clusters), the QED source `qemu-img convert -O qed` of the qcow2.',
    'Each run converts a fresh, fsynced `cp` of the source; `qemu-img convert` copies the same source to the',
    'same target and subformat (VHD with `force_size=on`, as imgconv keeps the exact size; the data-file qcow2 with',
    '`data_file=…,data_file_raw=on`; its defaults otherwise: cache=unsafe, so its output is not yet on disk when it',
    'exits — the "then fsync" column is the `sync FILE…` that makes it durable; imgconv fsyncs inside its own time).',
    `Figures are median (min–max) over ${cfg.runs} run(s). Written = write_bytes from /proc/<pid>/io; extra = growth of`,
    'the image + journal + companion file (imgconv) or of every output file (qemu-img) over the run, apparent size',
    'and allocated blocks.',
    '',
    table(['image', 'conversion', 'tool', ...toolColumns(false)], rows),
    '',
    'Derived (medians). Planned = what `imgconv plan` reports: new metadata (a companion file\'s bytes included),',
    'data moved before the commit, and bytes moved after it to compact the file (QED counts unreferenced space as',
    'leaks). qemu-img compare judges the file a user opens: the descriptor or metadata file where there is one.',
    '',
    table(['image', 'conversion', 'speed-up vs qemu-img', 'speed-up vs qemu-img + fsync', 'planned metadata KiB', 'planned moved MiB', 'planned compaction MiB', 'written KiB', 'written ÷ planned', 'plan peak extra MiB', 'qemu-img compare'], derived),
    '',
    'Every format the driver registry knows, and where this benchmark measures conversions into it:',
    '',
    ...(coverage ?? []),
  ].join('\n');
  return { markdown: md, targets, results };
}
