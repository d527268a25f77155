/**
 * One conversion measured on one source image, the same way in every section: imgconv in place on a
 * fresh copy, `qemu-img convert` of the source to the same target (same format and subformat), and
 * optionally `cp` of the source. The in-place and moving sections differ only in their images and in
 * what they derive from these measurements.
 */
import { dirname, join, resolve } from 'node:path';
import type { ConversionPlan } from '../src/engine/convert.js';
import type { PhaseTimes } from './child.js';
import { type Config, imgconv, journalOf, log, phaseTimes, plan } from './context.js';
import { copyImage, remove } from './images.js';
import { measure, type Measurement } from './measure.js';
import { mmm, MiB, summarize } from './stats.js';

export interface Conversion {
  from: string;
  to: string;
  /** imgconv's `-o` for the target (absent: the target's defaults). */
  options?: Record<string, string>;
  /** The source in words when the format alone does not say it ("qcow2, 512-byte clusters"). */
  source?: string;
}

/** "k=v,k=v", as `-o` takes it. */
export function optionString(o: Record<string, string> | undefined): string {
  return Object.entries(o ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}

export function conversionLabel(c: Conversion): string {
  const opts = optionString(c.options);
  return `${c.source ?? c.from} → ${c.to}${opts ? ` -o ${opts}` : ''}`;
}

/** QEMU's name for a format, where it differs from imgconv's. */
export function qemuFormat(fmt: string): string {
  return fmt === 'vhd' ? 'vpc' : fmt;
}

/**
 * The `qemu-img convert` that makes the same target as the conversion: its -O, -o and every file it
 * writes (`out` first). imgconv's VHD target keeps the virtual size exactly (force_size), so qemu-img
 * is asked to as well; a qcow2 with a raw data file needs the data file named.
 */
export function qemuTarget(c: Conversion, out: string): { format: string; options: string; files: string[] } {
  const o = { ...(c.options ?? {}) };
  const files = [out];
  if (c.to === 'vhd') o.force_size = 'on';
  if (c.to === 'vmdk' && o.subformat === 'monolithicFlat') files.push(out.replace(/\.vmdk$/, '') + '-flat.vmdk');
  if (c.to === 'qcow2' && o.data_file_raw === 'on') {
    const data = `${out}.data`;
    files.push(data);
    Object.assign(o, { data_file: data, data_file_raw: 'on' });
    delete o.metadata_file;
  }
  return { format: qemuFormat(c.to), options: optionString(o), files };
}

export interface ConversionResult {
  conv: Conversion;
  label: string;
  plan: ConversionPlan;
  imgconv: Measurement[];
  qemu: Measurement[];
  /** `sync` of qemu-img's output, run after it (qemu-img convert's default cache mode does not flush). */
  qemuSync: Measurement[];
  /** Empty unless asked for. */
  cp: Measurement[];
  cpSync: Measurement[];
  /** qemu-img compare of the source and imgconv's result (first run). */
  identical: boolean;
  /** One more imgconv run in process, phase by phase (when asked for). */
  phases?: PhaseTimes;
}

/**
 * Measures `conv` on `src` (a durable image of format conv.from in cfg.dir) over cfg.runs runs; every
 * file made is removed again. `tag` keeps the scratch names of callers apart; `logAs` prefixes the log lines.
 */
export async function measureConversion(cfg: Config, src: string, conv: Conversion, what: { tag: string; logAs?: string; cp?: boolean; phases?: boolean }): Promise<ConversionResult> {
  const label = conversionLabel(conv);
  const opts = optionString(conv.options);
  const oArgs = opts ? ['-o', opts] : [];
  const work = join(cfg.dir, `${what.tag}-work.${conv.from}`);
  const out = join(cfg.dir, `${what.tag}-out.${conv.to}`);
  const copy = join(cfg.dir, `${what.tag}-copy.${conv.from}`);
  // Planned on the copy the runs convert: a companion file's name (VMDK flat descriptor, qcow2 metadata
  // file) derives from the image's (the plan names it as the image is named, or relative to its directory).
  await copyImage(src, work);
  const p = await plan(work, conv.to, conv.options);
  const companion = p.companion ? resolve(dirname(work), p.companion) : undefined;
  const mine = [work, journalOf(work), ...(companion ? [companion] : [])];
  const q = qemuTarget(conv, out);
  const res: ConversionResult = { conv, label, plan: p, imgconv: [], qemu: [], qemuSync: [], cp: [], cpSync: [], identical: false };
  for (let r = 0; r < cfg.runs; r++) {
    log(`${what.logAs ?? what.tag} ${label}: run ${r + 1}/${cfg.runs}`);
    if (r > 0) await copyImage(src, work);
    res.imgconv.push(await imgconv(['inplace', work, '--to', conv.to, ...oArgs, '--output', 'json'], { watch: mine }));
    if (r === 0) {
      // Judged through the file a user opens: the companion when there is one. cwd: QEMU opens a relative
      // data file name from its working directory.
      const result = companion ?? work;
      const cmp = await measure('qemu-img', ['compare', '-f', qemuFormat(conv.from), '-F', qemuFormat(conv.to), src, result], { allowFailure: true, cwd: cfg.dir });
      res.identical = cmp.exitCode === 0;
    }
    remove(...mine);
    res.qemu.push(await measure('qemu-img', ['convert', '-f', qemuFormat(conv.from), '-O', q.format, ...(q.options ? ['-o', q.options] : []), src, out], { watch: q.files }));
    res.qemuSync.push(await measure('sync', q.files));
    remove(...q.files);
    if (what.cp) {
      res.cp.push(await measure('cp', [src, copy], { watch: [copy] }));
      res.cpSync.push(await measure('sync', [copy]));
      remove(copy);
    }
  }
  if (what.phases) {
    log(`${what.logAs ?? what.tag} ${label}: one more run timing the phases in process`);
    await copyImage(src, work);
    res.phases = await phaseTimes(work, conv.to, opts);
    remove(...mine);
  }
  return res;
}

/** "median (min–max)" of one figure over a tool's runs. */
export function figure(ms: Measurement[], f: (m: Measurement) => number, scale: number, decimals = 2): string {
  return mmm(summarize(ms.map(f)), scale, decimals);
}

/** Median of one figure over a tool's runs. */
export function median(ms: Measurement[], f: (m: Measurement) => number): number {
  return summarize(ms.map(f)).median;
}

/** Guest bytes per second of each run (with the sync after it, when given). */
export function throughputs(ms: Measurement[], bytes: number, syncs?: Measurement[]): number[] {
  return ms.map((m, i) => bytes / ((m.wallMs + (syncs?.[i]?.wallMs ?? 0)) / 1000));
}

/**
 * A tool's row of measured figures, in the order of toolColumns(bytes !== undefined). Throughput (guest
 * bytes ÷ wall time; durable: ÷ wall time + the sync after it) only when `bytes` is given.
 */
export function toolRow(ms: Measurement[], syncs: Measurement[] | undefined, bytes?: number): string[] {
  const thr = (s?: Measurement[]) => mmm(summarize(throughputs(ms, bytes!, s)), MiB, 1);
  return [
    figure(ms, (m) => m.wallMs, 1000, 3),
    syncs?.length ? figure(syncs, (m) => m.wallMs, 1000, 3) : '—',
    ...(bytes === undefined ? [] : [thr(), thr(syncs)]),
    figure(ms, (m) => m.writeBytes, MiB),
    figure(ms, (m) => m.peakRssBytes, MiB, 1),
    figure(ms, (m) => m.peakExtraSizeBytes, MiB),
    figure(ms, (m) => m.peakExtraAllocBytes, MiB),
  ];
}

export function toolColumns(throughput: boolean): string[] {
  return ['wall s', 'then fsync s', ...(throughput ? ['throughput MiB/s', 'durable throughput MiB/s'] : []), 'written MiB', 'peak RSS MiB', 'peak extra size MiB', 'peak extra allocated MiB'];
}
