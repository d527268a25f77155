/**
 * The all-directions matrix (issue 4's acceptance criterion): every fixture of the matrix
 * (fixtures/generate.sh) converted in place to every target, each case judged by qemu-img. This file
 * holds the targets, the case list, the judgement of one case and the markdown report; the test is
 * directions.test.ts.
 *
 * A case either succeeds — qemu-img compare identical to the untouched original, qemu-img check clean
 * where the format has a check, qemu-img info probing the target with the virtual size unchanged, the
 * plan's moved bytes and final size what the conversion measurably did, disk usage within the bound
 * below — or is refused before any write: an ImgconvError, the file byte-identical, no journal left.
 * Anything else is a problem, listed one line each.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { checkExitCode, checkImage } from '../../src/check.js';
import { ConversionFailedError, convertInPlace, planConversion, type ConversionPlan, type ConversionReport } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { ImgconvError } from '../../src/errors.js';
import { openImage } from '../../src/image.js';
import { isProbeTrap, type MatrixRow } from './matrix.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** VHD dynamic block size (imgconv writes 2 MiB blocks, as QEMU does). */
const VHD_BLOCK = 2 * MiB;
/** Slack in the disk-usage bound: a partly written first cluster, a filesystem block or two. */
export const USAGE_SLACK = 64 * KiB;

export interface Target {
  /** Column name in the report. */
  key: string;
  to: string;
  /** The subformat the result must have (imgconv's info.subformat), when the format has several. */
  subformat?: string;
  /** -o options; `sameFormat` replaces them when the source is already `to` (naming the subformat). */
  options: Record<string, string>;
  sameFormatOptions?: Record<string, string>;
  /** qemu's name for the format (-F for compare, -f for check). */
  qemuFormat: string;
  /** What `qemu-img info` without -f says the result is (a fixed VHD probes as raw in QEMU 7.2). */
  qemuProbe: string;
  /**
   * The conversion creates a file beside the image, and that file is the result qemu-img and imgconv
   * open: VMDK monolithicFlat's descriptor (the image becomes its raw extent), the qcow2 metadata file
   * of a raw external data file (the image becomes the data file). Such a target is a layout of its
   * own: a source of the same format without that subformat or layout converts to it too.
   */
  companion?: 'descriptor' | 'qcow2 metadata';
}

export const TARGETS: readonly Target[] = [
  { key: 'qcow2', to: 'qcow2', options: {}, qemuFormat: 'qcow2', qemuProbe: 'qcow2' },
  { key: 'qed', to: 'qed', options: {}, qemuFormat: 'qed', qemuProbe: 'qed' },
  { key: 'vmdk', to: 'vmdk', subformat: 'monolithicSparse', options: {}, sameFormatOptions: { subformat: 'monolithicSparse' }, qemuFormat: 'vmdk', qemuProbe: 'vmdk' },
  { key: 'vmdk flat', to: 'vmdk', subformat: 'monolithicFlat', options: { subformat: 'monolithicFlat' }, qemuFormat: 'vmdk', qemuProbe: 'vmdk', companion: 'descriptor' },
  { key: 'qcow2 data file', to: 'qcow2', options: { data_file_raw: 'on' }, qemuFormat: 'qcow2', qemuProbe: 'qcow2', companion: 'qcow2 metadata' },
  { key: 'vhd', to: 'vhd', subformat: 'dynamic', options: {}, sameFormatOptions: { subformat: 'dynamic' }, qemuFormat: 'vpc', qemuProbe: 'vpc' },
  { key: 'vhd fixed', to: 'vhd', subformat: 'fixed', options: { subformat: 'fixed' }, qemuFormat: 'vpc', qemuProbe: 'raw' },
  { key: 'raw', to: 'raw', options: {}, qemuFormat: 'raw', qemuProbe: 'raw' },
];

/**
 * The source's subformat as the matrix notes describe it (the list is needed before anything is
 * built); the judgement checks it against what imgconv reads, so a wrong guess fails loudly.
 */
export function expectedSubformat(row: MatrixRow): string | undefined {
  if (row.imgconvFormat === 'vhd') return /\bfixed\b/.test(row.notes) ? 'fixed' : 'dynamic';
  if (row.imgconvFormat === 'vmdk') return /streamOptimized/.test(row.notes) ? 'streamOptimized' : /monolithicFlat/.test(row.notes) ? 'monolithicFlat' : 'monolithicSparse';
  return undefined;
}

/** The source kind used to group fixtures (a README row): the format, with VMDK and VHD subformats apart. */
export function sourceKind(row: MatrixRow): string {
  const sub = expectedSubformat(row);
  if (row.imgconvFormat === 'vhd') return `vhd ${sub}`;
  if (row.imgconvFormat === 'vmdk' && sub !== 'monolithicSparse') return `vmdk ${sub === 'streamOptimized' ? 'stream' : 'flat'}`;
  return row.imgconvFormat;
}

export interface Case {
  row: MatrixRow;
  target: Target;
  options: Record<string, string>;
  /** `row.name → target.key`, the id used in the test name, the bug list and the report. */
  id: string;
}

/** Whether a source of the target's own format converts to it: it has subformats, or a layout of its own (a companion file). */
export const convertsWithinFormat = (t: Target) => t.subformat !== undefined || t.companion !== undefined;

/**
 * Every fixture × every target, except a target that is the source's own format and subformat
 * (nothing to convert). Within a format, a different subformat is a conversion (VHD dynamic ⇄ fixed,
 * VMDK streamOptimized/monolithicFlat → monolithicSparse) and is asked for by naming it; so is a
 * layout of its own (qcow2 → qcow2 with a raw data file, asked for with -o data_file_raw=on; a qcow2
 * source that already has a data file is a case too, like any other qcow2).
 */
export function allCases(rows: readonly MatrixRow[]): Case[] {
  const out: Case[] = [];
  for (const row of rows) {
    for (const target of TARGETS) {
      const same = row.imgconvFormat === target.to;
      if (same && (target.subformat !== undefined ? target.subformat === expectedSubformat(row) : target.companion === undefined)) continue;
      const options = same && target.sameFormatOptions ? target.sameFormatOptions : target.options;
      out.push({ row, target, options, id: `${row.name} → ${target.key}` });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// One case.

export interface Measured {
  plan: Pick<ConversionPlan, 'dataMoveBytes' | 'finalLength' | 'metadataBytes' | 'compactionMoveBytes'> & { via?: string };
  report: Pick<ConversionReport, 'dataMoveBytes' | 'finalLength' | 'metadataBytes'> & { via?: string; compactionBytes: number; reclaimedBytes: number };
  /** st_blocks × 512 of the source (the image and its data files) and of the result (with its companion file). */
  sourceUsage: number;
  usage: number;
  usageBound: number;
  /** Target cluster size qemu-img info reports (the plan's final-size tolerance), 0 when it has none. */
  clusterSize: number;
  /** qemu-img check, in words. */
  check: string;
}

export interface Outcome {
  id: string;
  kind: 'ok' | 'refused';
  /** ok: what was done; refused: the error. */
  measured?: Measured;
  error?: { name: string; message: string; imageState?: string };
  /** One line per failed judgement; empty when the case holds. */
  problems: string[];
  /** Files the case left beside the image (a VMDK flat descriptor); the caller removes them. */
  created: string[];
  ms: number;
}

const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');
const usageOf = (p: string) => statSync(p).blocks * 512;

function qemu(args: string[], cwd: string): { status: number; out: string } {
  const r = spawnSync('qemu-img', args, { cwd, encoding: 'utf8', maxBuffer: 64 << 20 });
  return { status: r.status ?? -1, out: (r.stdout ?? '') + (r.stderr ?? '') };
}

/** The format `qemu-img info` probes, or `error: …` when it cannot open the file without -f. */
function qemuProbe(file: string): string {
  const r = qemu(['info', '--output=json', basename(file)], dirname(file));
  if (r.status !== 0) return `error: ${r.out.trim().split('\n')[0]}`;
  return String((JSON.parse(r.out.slice(r.out.indexOf('{'))) as { format: unknown }).format);
}

function qemuInfo(file: string, format?: string): Record<string, unknown> {
  const out = execFileSync('qemu-img', ['info', '--output=json', ...(format ? ['-f', format] : []), basename(file)], { cwd: dirname(file), encoding: 'utf8' });
  return JSON.parse(out) as Record<string, unknown>;
}

/**
 * qemu-img check in words, or the problem with it. qcow2 and VMDK: exit 0. QED: no corruption, and
 * exactly QEMU 7.2's phantom leak count ⌊N/(cs−1)⌋ on an N-cluster file (a miscount of its own; see
 * test/engine/convert-qed.test.ts). vpc and raw have no check in QEMU (exit 63): imgconv's own check
 * must be clean instead.
 */
async function judgeCheck(file: string, target: Target): Promise<{ words: string; problem?: string }> {
  if (target.qemuFormat === 'qed') {
    const r = qemu(['check', '--output=json', '-f', 'qed', basename(file)], dirname(file));
    let j: { corruptions?: number; leaks?: number; 'check-errors'?: number };
    try {
      j = JSON.parse(r.out.slice(r.out.indexOf('{'))) as typeof j;
    } catch {
      return { words: 'unreadable', problem: `qemu-img check -f qed: ${r.out.trim()}` };
    }
    const cs = qemuInfo(file, 'qed')['cluster-size'] as number;
    const phantom = Math.floor(Math.floor(statSync(file).size / cs) / (cs - 1));
    const words = `qed: ${j.corruptions ?? 0} corruptions, ${j.leaks ?? 0} leaks (${phantom} phantom)`;
    if ((j.corruptions ?? 0) || (j['check-errors'] ?? 0) || (j.leaks ?? 0) !== phantom) return { words, problem: `qemu-img check -f qed: ${r.out.trim()}` };
    return { words };
  }
  if (target.qemuFormat === 'qcow2' || target.qemuFormat === 'vmdk') {
    const r = qemu(['check', '-f', target.qemuFormat, basename(file)], dirname(file));
    if (r.status !== 0) return { words: `exit ${r.status}`, problem: `qemu-img check -f ${target.qemuFormat} exit ${r.status}: ${r.out.trim()}` };
    return { words: 'exit 0' };
  }
  const r = qemu(['check', '-f', target.qemuFormat, basename(file)], dirname(file));
  if (r.status !== 63 || !r.out.includes('does not support checks')) return { words: `exit ${r.status}`, problem: `qemu-img check -f ${target.qemuFormat}: expected "does not support checks" (63), got ${r.status}: ${r.out.trim()}` };
  const chain = await openImage(file, { drivers: allDrivers, format: target.to, backing: false });
  try {
    const report = await checkImage(chain.layers[0]!);
    const code = checkExitCode(report);
    if (code !== 0) return { words: `imgconv check exit ${code}`, problem: `imgconv check exit ${code}: ${report.messages.slice(0, 3).join(' | ')}` };
    return { words: 'no qemu check; imgconv check clean' };
  } finally {
    await chain.close();
  }
}

/** Guest bytes the source stores compressed (a conversion writes them decompressed). */
async function compressedBytes(file: string, format: string | undefined): Promise<number> {
  const chain = await openImage(file, { drivers: allDrivers, ...(format ? { format } : {}), backing: false });
  try {
    let n = 0;
    for (const e of await chain.layers[0]!.mapping()) if (e.kind === 'compressed') n += e.length;
    return n;
  } finally {
    await chain.close();
  }
}

/** What imgconv reads of a file: format, subformat, backing name, and the VHD blocks that hold data. */
async function imgconvView(file: string, format?: string): Promise<{ format: string; subformat?: string; backing?: string; dataBlocks: number }> {
  const chain = await openImage(file, { drivers: allDrivers, ...(format ? { format } : {}), backing: false });
  try {
    const img = chain.layers[0]!;
    const blocks = new Set<number>();
    for (const e of await img.mapping()) {
      if (e.kind !== 'data') continue;
      for (let b = Math.floor(e.guest / VHD_BLOCK); b * VHD_BLOCK < e.guest + e.length; b++) blocks.add(b);
    }
    return { format: img.format, ...(img.info.subformat ? { subformat: img.info.subformat } : {}), ...(img.info.backing ? { backing: img.info.backing.filename } : {}), dataBlocks: blocks.size };
  } finally {
    await chain.close();
  }
}

/**
 * The other files the original keeps guest data in (qemu-img info: a qcow2 data file, VMDK extents
 * other than the image), as the same names relative to `dir` (the work copies beside the case's image).
 */
function sourceDataFiles(original: string, origInfo: Record<string, unknown>, dir: string): string[] {
  const data = ((origInfo['format-specific'] as { data?: Record<string, unknown> } | undefined)?.data ?? {}) as {
    'data-file'?: unknown;
    extents?: { filename?: unknown }[];
  };
  const names: string[] = [];
  if (typeof data['data-file'] === 'string') names.push(data['data-file']);
  for (const e of data.extents ?? []) if (typeof e.filename === 'string') names.push(e.filename);
  const at = dirname(original);
  return [...new Set(names.map((n) => resolve(at, n)).filter((p) => p !== resolve(original)).map((p) => join(dir, relative(at, p))))];
}

/**
 * How qemu-img is to open the original from any working directory: its path, or for a qcow2 with a
 * relative data file name (which QEMU 7.2 resolves against the working directory) a json: name giving
 * that data file beside the original.
 */
function qemuSource(original: string, origInfo: Record<string, unknown>): string {
  const dataFile = (origInfo['format-specific'] as { data?: { 'data-file'?: unknown } } | undefined)?.data?.['data-file'];
  if (origInfo.format !== 'qcow2' || typeof dataFile !== 'string' || isAbsolute(dataFile)) return original;
  return `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: original }, 'data-file': { driver: 'file', filename: join(dirname(original), dataFile) } })}`;
}

function errorOf(e: unknown): Outcome['error'] {
  const err = e as Error;
  return { name: err?.name ?? typeof e, message: err?.message ?? String(e), ...(e instanceof ConversionFailedError ? { imageState: e.imageState } : {}) };
}

/**
 * Plans and converts `file` (a copy of `original`, beside its backing files) and judges the result.
 * Never throws for a judgement: every failed one is a line in `problems`.
 */
export async function runCase(c: Case, original: string, file: string): Promise<Outcome> {
  const t0 = performance.now();
  const problems: string[] = [];
  const { row, target } = c;
  const format = isProbeTrap(row) ? 'raw' : undefined; // what QEMU needs too; probing names -f raw
  const opts = { to: target.to, options: c.options, drivers: allDrivers, ...(format ? { format } : {}) };
  const dir = dirname(file);
  const filesBefore = new Set(readdirSync(dir));
  const newFiles = () => readdirSync(dir).filter((n) => !filesBefore.has(n)).map((n) => join(dir, n));
  const done = (o: Omit<Outcome, 'id' | 'problems' | 'ms' | 'created'>): Outcome => ({ id: c.id, ...o, problems, created: newFiles(), ms: Math.round(performance.now() - t0) });

  const hashBefore = sha(file);
  const origInfo = qemuInfo(original, row.qemuFormat);
  // The source's footprint: the image and the files it keeps guest data in (a qcow2 data file, a VMDK
  // flat extent), the copies beside `file`, which a conversion may take over (adoption renames the data
  // file to the image's path).
  const sourceUsage = [file, ...sourceDataFiles(original, origInfo, dir)].reduce((n, p) => n + (existsSync(p) ? usageOf(p) : 0), 0);
  const vsize = origInfo['virtual-size'] as number;
  const expectedSub = expectedSubformat(row);
  if (expectedSub !== undefined) {
    const v = await imgconvView(file, format).catch(() => undefined);
    if (v && v.subformat !== expectedSub) problems.push(`the matrix notes say ${expectedSub}, imgconv reads ${v.subformat}: fix expectedSubformat()`);
  }
  const decompressed = await compressedBytes(file, format).catch(() => 0);

  let plan: ConversionPlan | undefined;
  let planError: unknown;
  try {
    plan = await planConversion(file, opts);
  } catch (e) {
    planError = e;
  }
  if (sha(file) !== hashBefore) problems.push('plan wrote to the image');

  let report: ConversionReport | undefined;
  try {
    report = await convertInPlace(file, opts);
  } catch (e) {
    const error = errorOf(e);
    if (!(e instanceof ImgconvError)) problems.push(`not a refusal: ${error!.name}: ${error!.message}`);
    if (e instanceof ConversionFailedError && e.imageState !== 'untouched') problems.push(`conversion failed leaving the image ${e.imageState}: ${e.message}`);
    if (sha(file) !== hashBefore) problems.push('the refused image is not byte-identical');
    if (existsSync(journalPath(file))) problems.push('a journal was left beside the refused image');
    else if (newFiles().length) problems.push(`the refused conversion left ${newFiles().map((f) => basename(f)).join(', ')}`);
    if (plan) problems.push(`plan predicted a conversion (${plan.dataMoveBytes} bytes moved), inplace refused`);
    return done({ kind: 'refused', error });
  }
  if (!plan) problems.push(`plan refused (${errorOf(planError)!.message}) but the conversion succeeded`);
  let measured: Measured | undefined;
  try {
    measured = await judgeConverted(c, original, file, { plan, report, vsize, origInfo, sourceUsage, decompressed, created: newFiles() }, problems);
  } catch (e) {
    problems.push(`judging the result failed: ${(e as Error).message}`);
  }
  return done({ kind: 'ok', ...(measured ? { measured } : {}) });
}

interface Facts {
  plan: ConversionPlan | undefined;
  report: ConversionReport;
  vsize: number;
  origInfo: Record<string, unknown>;
  sourceUsage: number;
  decompressed: number;
  /** New files beside the image after the conversion. */
  created: string[];
}

/** The judgement of a converted image; pushes a line per failed judgement. */
async function judgeConverted(c: Case, original: string, file: string, f: Facts, problems: string[]): Promise<Measured> {
  const { row, target } = c;
  const { plan, report, vsize, origInfo, sourceUsage, decompressed } = f;
  if (existsSync(journalPath(file))) problems.push('journal left after a successful conversion');
  // A companion target (VMDK monolithicFlat, qcow2 with a raw data file): the image becomes the raw
  // extent or data file of a descriptor or qcow2 metadata file created beside it; qemu-img and imgconv
  // open that file. Any other target leaves no file beside the image.
  const companion = report.companion;
  if (target.companion !== undefined && (companion === undefined || !existsSync(companion))) problems.push(`no ${target.companion} file (report.companion ${companion})`);
  if (target.companion !== undefined && companion !== undefined && dirname(companion) !== dirname(file)) problems.push(`the ${target.companion} file ${companion} is not beside the image`);
  if (target.companion === undefined && companion !== undefined) problems.push(`report names a companion file ${companion}, the target has none`);
  if (plan && plan.companion !== companion) problems.push(`plan names the companion ${plan.companion}, the conversion made ${companion}`);
  const expectedNew = companion !== undefined ? [companion] : [];
  const stray = f.created.filter((n) => !expectedNew.includes(n));
  if (stray.length) problems.push(`files left beside the image: ${stray.map((n) => basename(n)).join(', ')}`);
  const judged = companion ?? file;

  // qemu-img compare against the untouched original (explicit formats on both sides). Run in the
  // result's directory: QEMU 7.2 resolves a qcow2 metadata file's relative data file name against its
  // working directory, not the metadata file's (every other qemu-img call below runs there too). The
  // original's backing files resolve against its own directory whatever the working directory is; its
  // data file, if it has one, is named explicitly (qemuSource).
  const cmp = qemu(['compare', '-f', row.qemuFormat, '-F', target.qemuFormat, qemuSource(original, origInfo), basename(judged)], dirname(judged));
  if (cmp.status !== 0 || !cmp.out.includes('Images are identical')) problems.push(`qemu-img compare exit ${cmp.status}: ${cmp.out.trim().split('\n').slice(0, 3).join(' | ')}`);

  // qemu-img info: probes as the target, virtual size and backing file unchanged. An identity target
  // (raw, VHD fixed) begins with the guest's first sector: made from a probe trap (a raw disk whose
  // first sector carries another format's magic), it is one too, and QEMU may fail to probe it exactly
  // as it fails on the source; it must then open with -f.
  const probed = qemuProbe(judged);
  const identityTarget = target.qemuProbe === 'raw';
  if (probed !== target.qemuProbe && !(isProbeTrap(row) && identityTarget && probed.startsWith('error'))) {
    problems.push(`qemu-img info probes ${probed}, expected ${target.qemuProbe}`);
  }
  const infoF = qemuInfo(judged, target.qemuFormat);
  if (infoF['virtual-size'] !== vsize) problems.push(`virtual size ${String(infoF['virtual-size'])}, source ${vsize}`);
  if (infoF['backing-filename'] !== origInfo['backing-filename']) problems.push(`backing file ${String(infoF['backing-filename'])}, source ${String(origInfo['backing-filename'])}`);
  if (target.companion === 'qcow2 metadata') {
    // The metadata file names the image as its raw data file, by the name beside it.
    const data = ((infoF['format-specific'] as { data?: Record<string, unknown> } | undefined)?.data ?? {}) as Record<string, unknown>;
    if (data['data-file'] !== basename(file) || data['data-file-raw'] !== true) {
      problems.push(`qemu-img info: data-file ${String(data['data-file'])}, data-file-raw ${String(data['data-file-raw'])}; expected ${basename(file)}, true`);
    }
  }
  const view = await imgconvView(judged);
  if (view.format !== target.to) problems.push(`imgconv probes ${view.format}, expected ${target.to}`);
  if (target.subformat !== undefined && view.subformat !== target.subformat) problems.push(`subformat ${view.subformat}, expected ${target.subformat}`);

  const check = await judgeCheck(judged, target);
  if (check.problem) problems.push(check.problem);

  // The plan is what was measurably done: moved bytes exactly, final size within one cluster.
  const clusterSize = (infoF['cluster-size'] as number | undefined) ?? 0;
  const size = statSync(file).size;
  if (size !== report.finalLength) problems.push(`file length ${size}, report.finalLength ${report.finalLength}`);
  if (plan) {
    if (report.dataMoveBytes !== plan.dataMoveBytes) problems.push(`moved ${report.dataMoveBytes} bytes, plan said ${plan.dataMoveBytes}`);
    if (Math.abs(report.finalLength - plan.finalLength) > clusterSize) problems.push(`final length ${report.finalLength}, plan said ${plan.finalLength} (more than one cluster, ${clusterSize}, apart)`);
    const pv = plan.steps?.[0]?.target.format;
    const rv = report.steps?.[0]?.target.format;
    if (pv !== rv) problems.push(`plan goes via ${pv ?? 'nothing'}, the conversion went via ${rv ?? 'nothing'}`);
  }

  // Disk usage: not above the source's (with its data files) plus the new metadata (VHD dynamic: plus
  // each allocated block's rounding to 2 MiB; compressed sources: plus their data decompressed) plus slack.
  const usage = usageOf(file) + (companion !== undefined && existsSync(companion) ? usageOf(companion) : 0);
  const vhdRounding = target.to === 'vhd' && target.subformat === 'dynamic' ? view.dataBlocks * VHD_BLOCK : 0;
  const usageBound = sourceUsage + report.metadataBytes + vhdRounding + decompressed + USAGE_SLACK;
  if (usage > usageBound) {
    problems.push(`disk usage ${usage} above ${usageBound} (source ${sourceUsage} + metadata ${report.metadataBytes} + VHD rounding ${vhdRounding} + decompressed ${decompressed} + slack ${USAGE_SLACK})`);
  }

  return {
    plan: plan
      ? { dataMoveBytes: plan.dataMoveBytes, finalLength: plan.finalLength, metadataBytes: plan.metadataBytes, compactionMoveBytes: plan.compactionMoveBytes, ...(plan.steps ? { via: plan.steps[0]!.target.format } : {}) }
      : { dataMoveBytes: NaN, finalLength: NaN, metadataBytes: NaN, compactionMoveBytes: NaN },
    report: {
      dataMoveBytes: report.dataMoveBytes,
      finalLength: report.finalLength,
      metadataBytes: report.metadataBytes,
      compactionBytes: report.written.compactionBytes,
      reclaimedBytes: report.reclaimedBytes,
      ...(report.steps ? { via: report.steps[0]!.target.format } : {}),
    },
    sourceUsage,
    usage,
    usageBound,
    clusterSize,
    check: check.words,
  };
}

// ---------------------------------------------------------------------------------------------------
// The default subset: every fixture at least once, every source kind × target at least once.

/**
 * Per source kind, fixtures F and the targets T its cases reach: case j pairs F[j mod |F|] with
 * T[j mod |T|] for j < max(|F|, |T|), so each fixture and each target of the kind appears. A pair
 * `slow` rules out (a multi-GiB disk to an identity target) is replaced by the next fixture for that
 * target and the next target for that fixture.
 */
export function defaultSubset(cases: readonly Case[], slow: (c: Case) => boolean): Case[] {
  const byKind = new Map<string, Case[]>();
  for (const c of cases) {
    const k = sourceKind(c.row);
    if (!byKind.has(k)) byKind.set(k, []);
    byKind.get(k)!.push(c);
  }
  const picked = new Set<Case>();
  for (const list of byKind.values()) {
    const fixtures = [...new Set(list.map((c) => c.row.name))];
    const targets = [...new Set(list.map((c) => c.target.key))];
    const find = (f: string, t: string) => list.find((c) => c.row.name === f && c.target.key === t);
    const n = Math.max(fixtures.length, targets.length);
    for (let j = 0; j < n; j++) {
      const c = find(fixtures[j % fixtures.length]!, targets[j % targets.length]!);
      if (c && !slow(c)) {
        picked.add(c);
        continue;
      }
      for (let k = 1; k < fixtures.length; k++) {
        const alt = find(fixtures[(j + k) % fixtures.length]!, targets[j % targets.length]!);
        if (alt && !slow(alt)) { picked.add(alt); break; }
      }
      for (let k = 1; k < targets.length; k++) {
        const alt = find(fixtures[j % fixtures.length]!, targets[(j + k) % targets.length]!);
        if (alt && !slow(alt)) { picked.add(alt); break; }
      }
    }
  }
  return cases.filter((c) => picked.has(c));
}

// ---------------------------------------------------------------------------------------------------
// The report (test/directions-report.md).

/** A refusal the matrix expects: which cases, the words the message must contain, what the user can do. */
export interface ExpectedRefusal {
  tag: string;
  applies: (c: Case) => boolean;
  reason: RegExp;
  instead: string;
}

/** An engine bug found by this test: which judgement it fails (a problem line matches `problem`). */
export interface KnownBug {
  key: string;
  problem: RegExp;
  summary: string;
}

export function bytes(n: number): string {
  if (!Number.isFinite(n)) return '?';
  if (n < KiB) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB'];
  let v = n / KiB;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[u]}`;
}

export interface ReportInput {
  cases: readonly Case[];
  ran: readonly Case[];
  outcomes: ReadonlyMap<string, Outcome>;
  refusals: readonly ExpectedRefusal[];
  bugs: readonly KnownBug[];
  /** Case id → bug keys it is marked with (it.fails). */
  marked: ReadonlyMap<string, readonly string[]>;
  full: boolean;
  wallMs: number;
  qemuVersion: string;
}

const esc = (s: string) => s.replace(/\|/g, '\\|').replace(/\n/g, ' ');

function refusalTag(o: Outcome, c: Case, refusals: readonly ExpectedRefusal[]): string {
  const r = refusals.find((x) => x.applies(c) && x.reason.test(o.error?.message ?? ''));
  return r ? r.tag : 'unexpected';
}

/** One cell of the per-fixture table. */
function cell(c: Case, o: Outcome | undefined, input: ReportInput): string {
  if (!o) return 'not run';
  const marks = input.marked.get(c.id) ?? [];
  const bug = o.problems.length ? ` **BUG** (${marks.length ? marks.join(', ') : 'new'})` : '';
  if (o.kind === 'refused') return o.problems.length ? `failed:${bug}` : `refused: ${refusalTag(o, c, input.refusals)}`;
  const m = o.measured;
  if (!m) return `ok?${bug}`;
  return `ok, moved ${bytes(m.report.dataMoveBytes)}${m.report.via ? ` via ${m.report.via}` : ''}${bug}`;
}

/** Summary of every case of one source kind to one target (a cell of the README matrix). */
export function kindCell(list: readonly Case[], input: ReportInput): string {
  const os = list.map((c) => ({ c, o: input.outcomes.get(c.id) })).filter((x) => x.o !== undefined) as { c: Case; o: Outcome }[];
  if (os.length === 0) return list.length ? 'not run' : '—';
  const ok = os.filter((x) => x.o.kind === 'ok' && x.o.measured !== undefined);
  const refused = os.filter((x) => x.o.kind === 'refused');
  const parts: string[] = [];
  if (ok.length) {
    const moved = ok.map((x) => x.o.measured!.report.dataMoveBytes);
    const lo = Math.min(...moved);
    const hi = Math.max(...moved);
    const via = [...new Set(ok.map((x) => x.o.measured!.report.via).filter((v) => v !== undefined))];
    const what = hi === 0 ? 'in place' : lo === hi ? `moves ${bytes(hi)}` : `moves ${bytes(lo)}–${bytes(hi)}`;
    parts.push(`${ok.length === os.length ? '' : `${ok.length}: `}${what}${via.length ? `, two steps via ${via.join('/')}` : ''}`);
  }
  if (refused.length) {
    const tags = [...new Set(refused.map((x) => (x.o.problems.length ? 'after the commit point' : refusalTag(x.o, x.c, input.refusals))))];
    parts.push(`${refused.length === os.length ? '' : `${refused.length}: `}refused (${tags.join(', ')})`);
  }
  const buggy = os.filter((x) => x.o.problems.length);
  if (buggy.length) parts.push(`${buggy.length} BUG`);
  return parts.join('; ');
}

export function renderReport(input: ReportInput): string {
  const { cases, ran, outcomes } = input;
  const ranOutcomes = ran.map((c) => outcomes.get(c.id)).filter((o): o is Outcome => o !== undefined);
  const ok = ranOutcomes.filter((o) => o.kind === 'ok');
  const refused = ranOutcomes.filter((o) => o.kind === 'refused');
  const buggy = ranOutcomes.filter((o) => o.problems.length);
  const L: string[] = [];
  L.push('# Every direction: the fixture matrix × every target');
  L.push('');
  L.push('Generated by `test/integration/directions.test.ts` (' + (input.full ? '`IMGCONV_DIRECTIONS_FULL=1 IMGCONV_DIRECTIONS_REPORT=1`, every case' : '`IMGCONV_DIRECTIONS_REPORT=1`, the default subset') + `); do not edit by hand. ${input.qemuVersion}, Node ${process.version}.`);
  L.push('');
  L.push(`Cases: ${ran.length} run of ${cases.length} (fixtures × targets, without a target that is the source's own format and subformat). ` +
    `**${ok.length} converted**, **${refused.length} refused** before any write, **${buggy.length} with a failed judgement** (BUG: marked \`it.fails\`, listed below). ` +
    `Wall time ${(input.wallMs / 1000).toFixed(1)} s; the slowest cases are listed at the end.`);
  L.push('');
  L.push('A conversion counts as done when qemu-img compare says identical against the untouched original, qemu-img check is clean (QED: ' +
    'only QEMU 7.2\'s phantom leak count; vpc and raw have no QEMU check, imgconv\'s own must be clean), qemu-img info probes the target ' +
    '(a fixed VHD probes as raw in QEMU) with the virtual size and backing file unchanged, the plan\'s moved bytes equal the conversion\'s and ' +
    'its final length is within one target cluster of the file\'s, and disk usage (st_blocks × 512) is at most the source\'s + new metadata ' +
    `(+ 2 MiB per allocated block for VHD dynamic, + the decompressed bytes of compressed sources) + ${bytes(USAGE_SLACK)}. ` +
    'A refusal counts when it is an imgconv error raised before any write: the file byte-identical, no journal left.');
  L.push('');

  // By source kind.
  const kinds = [...new Set(cases.map((c) => sourceKind(c.row)))];
  L.push('## By source kind');
  L.push('');
  L.push('Moved bytes are data copied before the commit point (a two-step conversion: both steps). "—": the same format and subformat.');
  L.push('');
  L.push(`| source (fixtures) | ${TARGETS.map((t) => t.key).join(' | ')} |`);
  L.push(`|---|${TARGETS.map(() => '---').join('|')}|`);
  for (const k of kinds) {
    const ofKind = ran.filter((c) => sourceKind(c.row) === k);
    const n = new Set(cases.filter((c) => sourceKind(c.row) === k).map((c) => c.row.name)).size;
    L.push(`| ${k} (${n}) | ${TARGETS.map((t) => esc(kindCell(ofKind.filter((c) => c.target.key === t.key), input))).join(' | ')} |`);
  }
  L.push('');

  // Every case.
  L.push('## Every case');
  L.push('');
  L.push(`| fixture | ${TARGETS.map((t) => t.key).join(' | ')} |`);
  L.push(`|---|${TARGETS.map(() => '---').join('|')}|`);
  const ranIds = new Set(ran.map((c) => c.id));
  for (const name of [...new Set(cases.map((c) => c.row.name))]) {
    const cells = TARGETS.map((t) => {
      const c = cases.find((x) => x.row.name === name && x.target.key === t.key);
      if (!c) return '—';
      return esc(ranIds.has(c.id) ? cell(c, outcomes.get(c.id), input) : 'not run');
    });
    L.push(`| ${name} | ${cells.join(' | ')} |`);
  }
  L.push('');

  // Refusals.
  L.push('## Refusals');
  L.push('');
  for (const r of input.refusals) {
    const hits = ran.filter((c) => outcomes.get(c.id)?.kind === 'refused' && refusalTag(outcomes.get(c.id)!, c, input.refusals) === r.tag);
    if (hits.length === 0) continue;
    L.push(`### ${r.tag} (${hits.length})`);
    L.push('');
    L.push(`Cases: ${hits.map((c) => c.id).join(', ')}.`);
    L.push('');
    L.push(`Message (${hits[0]!.id}): \`${outcomes.get(hits[0]!.id)!.error!.name}: ${outcomes.get(hits[0]!.id)!.error!.message.replace(/\/tmp\/\S*\//g, '')}\``);
    L.push('');
    L.push(`Instead: ${r.instead}`);
    L.push('');
  }
  const unexpected = ran.filter((c) => outcomes.get(c.id)?.kind === 'refused' && outcomes.get(c.id)!.problems.length === 0 && refusalTag(outcomes.get(c.id)!, c, input.refusals) === 'unexpected');
  if (unexpected.length) {
    L.push('### unexpected');
    L.push('');
    for (const c of unexpected) L.push(`- ${c.id}: \`${outcomes.get(c.id)!.error!.name}: ${esc(outcomes.get(c.id)!.error!.message.replace(/\/tmp\/\S*\//g, ''))}\``);
    L.push('');
  }

  // Bugs.
  L.push('## Bugs (failed judgements)');
  L.push('');
  if (buggy.length === 0) L.push('None.');
  for (const b of input.bugs) {
    const hits = ranOutcomes.filter((o) => o.problems.some((p) => b.problem.test(p)));
    if (hits.length === 0) continue;
    L.push(`### ${b.key} (${hits.length} cases)`);
    L.push('');
    L.push(b.summary);
    L.push('');
    for (const o of hits) L.push(`- ${o.id}: ${esc(o.problems.filter((p) => b.problem.test(p)).join('; ').replace(/\/tmp\/\S*\//g, ''))}`);
    L.push('');
  }
  const other = ranOutcomes.filter((o) => o.problems.some((p) => !input.bugs.some((b) => b.problem.test(p))));
  if (other.length) {
    L.push('### not yet classified');
    L.push('');
    for (const o of other) L.push(`- ${o.id}: ${esc(o.problems.filter((p) => !input.bugs.some((b) => b.problem.test(p))).join('; ').replace(/\/tmp\/\S*\//g, ''))}`);
    L.push('');
  }

  // Time.
  L.push('## Slowest cases');
  L.push('');
  L.push('| case | ms | outcome |');
  L.push('|---|---|---|');
  for (const o of ranOutcomes.slice().sort((a, b) => b.ms - a.ms).slice(0, 10)) L.push(`| ${o.id} | ${o.ms} | ${o.kind} |`);
  L.push('');
  return L.join('\n');
}
