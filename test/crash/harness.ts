/**
 * The crash-consistency harness: records a real in-place conversion on memory storage, generates the
 * crash states of its operation log (process kill, power loss, torn and garbage writes, and crashes of
 * `recover` itself), and checks each state:
 *
 *   after `recover` (or directly, when there is nothing to recover) the image is exactly one valid
 *   image — the source or the target format — with the original virtual size and guest content
 *   (SHA-256 of the whole disk through GuestReader, backing chain included), a clean check
 *   (no corruption, no leak, no check error), no journal left, and a second `recover` changes nothing.
 *
 * A state with a garbage sector may instead end in a clear error (an ImgconvError from recover or
 * open), never in a clean open that reads wrong bytes.
 *
 * Two budgets: the CI sample (seeded, bounded) and the full set (IMGCONV_CRASH_FULL=1).
 */
import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace, ConversionFailedError, type ConversionReport } from '../../src/engine/convert.js';
import { recover } from '../../src/engine/recover.js';
import { journalPath } from '../../src/engine/journal.js';
import { openImage } from '../../src/image.js';
import { GuestReader } from '../../src/guest.js';
import { checkImage } from '../../src/check.js';
import { ImgconvError, UnsupportedError } from '../../src/errors.js';
import type { MemoryStorage } from '../../src/blockdev/storage.js';
import {
  FaultyStorage,
  RecordingStorage,
  filesOf,
  memoryStorageOf,
  powerLossChoices,
  powerLossCuts,
  powerLossState,
  powerTornChoices,
  prng,
  stateAfter,
  storageDigest,
  tornChoices,
  tornState,
  type FaultCode,
  type Files,
  type Op,
} from '../support/recording.js';
import { qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { QEMU_FORMAT, type Fixture, type RowOptions } from './fixtures.js';

export const FULL = process.env.IMGCONV_CRASH_FULL === '1';
export const SEED = Number(process.env.IMGCONV_CRASH_SEED ?? 20261122);

export type Category = 'kill' | 'power' | 'power-torn' | 'torn' | 'garbage' | 'recover-kill' | 'recover-power' | 'recover-torn' | 'fault';
export const CATEGORIES: Category[] = ['kill', 'power', 'power-torn', 'torn', 'garbage', 'recover-kill', 'recover-power', 'recover-torn', 'fault'];

export interface Budget {
  /** How many states of each category to check per fixture (Infinity: all generated). */
  perCategory: Record<Category, number>;
  powerExhaustiveUpTo: number;
  powerSampled: number;
  tornExhaustiveUpTo: number;
  tornSampled: number;
  garbageSectors: number;
  /** How many journal-holding kill and power-loss states get their own `recover` recorded and crashed. */
  recoverBases: number;
  recoverPowerSampled: number;
  /** How many checked states per fixture are confirmed with qemu-img check + compare. */
  qemuConfirm: number;
}

export const BUDGET: Budget = FULL
  ? {
      perCategory: { kill: Infinity, power: Infinity, 'power-torn': Infinity, torn: Infinity, garbage: Infinity, 'recover-kill': Infinity, 'recover-power': Infinity, 'recover-torn': Infinity, fault: Infinity },
      powerExhaustiveUpTo: 10,
      powerSampled: 1024,
      tornExhaustiveUpTo: 8,
      tornSampled: 128,
      garbageSectors: Infinity,
      recoverBases: 200,
      recoverPowerSampled: 16,
      qemuConfirm: 8,
    }
  : {
      perCategory: { kill: 8, power: 6, 'power-torn': 3, torn: 4, garbage: 3, 'recover-kill': 4, 'recover-power': 2, 'recover-torn': 2, fault: 8 },
      powerExhaustiveUpTo: 10,
      powerSampled: 16,
      tornExhaustiveUpTo: 8,
      tornSampled: 8,
      garbageSectors: 2,
      recoverBases: 2,
      recoverPowerSampled: 2,
      qemuConfirm: 1,
    };

export interface Original {
  format: string;
  virtualSize: number;
  sha: string;
}

export interface Tally {
  pair: string;
  fixture: string;
  /** Distinct states checked per category. */
  states: Record<Category, number>;
  /** Garbage states that ended in a clear error rather than a valid image. */
  clearErrors: number;
  failures: string[];
  qemuConfirmed: number;
  /** The target refused this source (e.g. a VMDK target over a non-VMDK parent): nothing to crash. */
  refused?: string;
  /** Not run: an extra fixture of a pair that already had IMGCONV_CRASH_QUOTA states (suite.ts). */
  skipped?: string;
  opsRecorded: number;
  ms: number;
}

/** Format, virtual size and guest digest of the image in `storage` (backing chain followed). */
export async function describeImage(storage: MemoryStorage, image: string): Promise<{ format: string; virtualSize: number; sha: string; corruptions: number; leaks: number; checkErrors: number; messages: string[] }> {
  const chain = await openImage(image, { drivers: allDrivers, opener: (p, o) => storage.open(p, o) });
  try {
    const top = chain.layers[0]!;
    const r = await checkImage(top);
    const sha = await (await GuestReader.create(chain)).sha256(1 << 20);
    return { format: top.format, virtualSize: top.info.virtualSize, sha, corruptions: r.corruptions, leaks: r.leaks, checkErrors: r.checkErrors, messages: r.messages };
  } finally {
    await chain.close();
  }
}

async function subformatOf(storage: MemoryStorage, image: string): Promise<string | undefined> {
  const chain = await openImage(image, { drivers: allDrivers, opener: (p, o) => storage.open(p, o) });
  try {
    return chain.layers[0]!.info.subformat;
  } finally {
    await chain.close();
  }
}

/** `image`: the path that holds the valid image when it is not the fixture's own (a companion file). */
export type Verdict = { ok: true; clearError?: string; format?: string; image?: string } | { ok: false; why: string };

/** Files a conversion created beside the image (not the journal): a target's companion, e.g. a flat VMDK descriptor. */
export function createdFiles(initial: Files, live: MemoryStorage, image: string): string[] {
  return [...live.files.keys()].filter((p) => !initial.has(p) && p !== journalPath(image));
}

/** The check every crash state must pass (see the file comment). */
export async function checkState(state: MemoryStorage, fx: Fixture, to: string, orig: Original, garbage: boolean, companion?: string): Promise<Verdict> {
  const allowed = (e: unknown) => garbage && e instanceof ImgconvError;
  try {
    await recover(fx.image, { drivers: allDrivers, storage: state });
  } catch (e) {
    if (allowed(e)) return { ok: true, clearError: `recover: ${(e as Error).message}` };
    return { ok: false, why: `recover threw ${(e as Error).name}: ${(e as Error).message}` };
  }
  if (await state.exists(journalPath(fx.image))) return { ok: false, why: 'journal left behind after recover' };
  // A target with a companion file (VMDK monolithicFlat's descriptor): the image is the companion when
  // it exists — and then must be the target — else the untouched source file.
  const viaCompanion = companion !== undefined && (await state.exists(companion));
  let d: Awaited<ReturnType<typeof describeImage>>;
  try {
    d = await describeImage(state, viaCompanion ? companion : fx.image);
  } catch (e) {
    if (allowed(e)) return { ok: true, clearError: `open: ${(e as Error).message}` };
    return { ok: false, why: `open after recover threw ${(e as Error).name}: ${(e as Error).message}` };
  }
  if (viaCompanion && d.format !== to) return { ok: false, why: `the companion ${companion} opens as ${d.format}, not ${to}` };
  if (companion !== undefined && !viaCompanion && d.format !== orig.format) return { ok: false, why: `no companion, and the image is ${d.format}, not the source format ${orig.format}` };
  if (d.format !== orig.format && d.format !== to) return { ok: false, why: `format ${d.format} is neither ${orig.format} nor ${to}` };
  // An adopted data file became the image: once the image is no longer the source, its old name is gone.
  if (fx.dataFile !== undefined && d.format !== orig.format && (await state.exists(fx.dataFile))) return { ok: false, why: `the image is ${d.format} but the source's data file ${fx.dataFile} is still there` };
  if (d.virtualSize !== orig.virtualSize) return { ok: false, why: `virtual size ${d.virtualSize} ≠ ${orig.virtualSize} (${d.format})` };
  if (d.sha !== orig.sha) return { ok: false, why: `guest content differs (${d.format}) — a clean open returning wrong bytes` };
  if (d.corruptions || d.checkErrors || d.leaks) {
    return { ok: false, why: `check (${d.format}): ${d.corruptions} corruptions, ${d.leaks} leaks, ${d.checkErrors} errors: ${d.messages.slice(0, 2).join('; ')}` };
  }
  const before = storageDigest(state);
  let again;
  try {
    again = await recover(fx.image, { drivers: allDrivers, storage: state });
  } catch (e) {
    return { ok: false, why: `second recover threw: ${(e as Error).message}` };
  }
  if (again.action !== 'none') return { ok: false, why: `second recover did something: ${again.action}` };
  if (storageDigest(state) !== before) return { ok: false, why: 'second recover changed the files' };
  return { ok: true, format: d.format, ...(viaCompanion ? { image: companion } : {}) };
}

export async function originalOf(fx: Fixture): Promise<Original> {
  const d = await describeImage(memoryStorageOf(fx.files), fx.image);
  if (d.corruptions || d.leaks || d.checkErrors) throw new Error(`fixture ${fx.name} is not clean: ${d.messages.join('; ')}`);
  return { format: d.format, virtualSize: d.virtualSize, sha: d.sha };
}

/** The fixture's target options for `to` and its row's conversion options, as convertInPlace takes them. */
export function optionsFor(fx: Fixture, to: string): { options?: Record<string, string> } & RowOptions {
  const o = fx.options?.[to];
  return { ...(o ? { options: o } : {}), ...fx.convert };
}

/**
 * "vhd → qcow2"; with target options "vhd → vhd -o subformat=dynamic" (a within-format pair is its own
 * row), likewise a row's relocation window ("qed → vhd (relocation window 16 KiB)") and a source the
 * format alone does not name ("qcow2 (data_file_raw=on) → raw").
 */
export function pairName(fx: Fixture, to: string): string {
  const o = fx.options?.[to];
  const w = fx.convert?.relocationWindow;
  return `${fx.sourceLabel ?? fx.format} → ${to}${o ? ` -o ${Object.entries(o).map(([k, v]) => `${k}=${v}`).join(',')}` : ''}${w !== undefined ? ` (relocation window ${w / 1024} KiB)` : ''}`;
}

export async function recordConversion(files: Files, fx: Fixture, to: string): Promise<{ rec: RecordingStorage; report: ConversionReport }> {
  const rec = new RecordingStorage(files);
  const report = await convertInPlace(fx.image, { to, format: fx.format, drivers: allDrivers, storage: rec, ...optionsFor(fx, to) });
  return { rec, report };
}

/** The relocation rounds of a conversion: its relocating step's, when it took two. */
export function relocationRounds(report: ConversionReport): number {
  return Math.max(0, ...[report, ...(report.steps ?? [])].map((p) => p.relocation?.rounds ?? 0));
}

/** A crash state to check: how to build it and what it is. */
interface Candidate {
  category: Category;
  label: string;
  build: () => MemoryStorage;
  garbage: boolean;
}

/** Keeps `n` of `items` (all when n ≥ length), chosen by the seeded PRNG, in their original order. */
function sample<T>(items: T[], n: number, rnd: () => number): T[] {
  if (n >= items.length) return items;
  const idx = items.map((_, i) => i);
  for (let i = idx.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [idx[i], idx[j]] = [idx[j]!, idx[i]!];
  }
  return idx
    .slice(0, n)
    .sort((a, b) => a - b)
    .map((i) => items[i]!);
}

/** Every crash state of one recorded log, by category (descriptors only; states are built lazily). */
export function candidatesOf(initial: Files, log: Op[], rnd: () => number, b: Budget, prefix: '' | 'recover-', where: string): Candidate[] {
  const out: Candidate[] = [];
  const kill: Category = prefix ? 'recover-kill' : 'kill';
  const power: Category = prefix ? 'recover-power' : 'power';
  const torn: Category = prefix ? 'recover-torn' : 'torn';
  for (let n = 0; n <= log.length; n++) out.push({ category: kill, label: `${where} kill after op ${n}/${log.length}`, build: () => stateAfter(initial, log, n), garbage: false });
  for (const cut of powerLossCuts(log)) {
    for (const c of powerLossChoices(log, cut, rnd, prefix ? 6 : b.powerExhaustiveUpTo, prefix ? b.recoverPowerSampled : b.powerSampled)) {
      out.push({
        category: power,
        label: `${where} power loss before op ${cut}, kept [${c.kept.join(',')}]${c.reordered ? ' reordered' : ''}`,
        build: () => powerLossState(initial, log, cut, c.kept),
        garbage: false,
      });
    }
  }
  if (!prefix) {
    for (const cut of powerLossCuts(log)) {
      for (const c of powerTornChoices(log, cut, rnd, b.tornExhaustiveUpTo, Math.min(b.tornSampled, 32))) {
        out.push({
          category: 'power-torn',
          label: `${where} power loss before op ${cut}, kept [${c.kept.join(',')}], op ${c.torn.index} torn (${c.torn.mask.map((m) => (m ? 'N' : 'o')).join('')})`,
          build: () => powerLossState(initial, log, cut, c.kept, c.torn),
          garbage: false,
        });
      }
    }
  }
  for (let i = 0; i < log.length; i++) {
    if (log[i]!.kind !== 'write') continue;
    for (const c of tornChoices(log, i, rnd, b.tornExhaustiveUpTo, prefix ? 8 : b.tornSampled, prefix ? 2 : b.garbageSectors)) {
      const g = c.garbage >= 0;
      const seed = Math.floor(rnd() * 2 ** 31);
      out.push({
        category: g && !prefix ? 'garbage' : torn,
        label: `${where} ${g ? `garbage in sector ${c.garbage} of` : `torn (sectors ${c.mask.map((m) => (m ? 'N' : 'o')).join('')})`} write op ${i} (${(log[i] as { offset: number }).offset}+${(log[i] as { bytes: Uint8Array }).bytes.length} ${log[i]!.path.split('/').pop()}), garbage seed ${seed}`,
        build: () => tornState(initial, log, c, seed),
        garbage: g,
      });
    }
  }
  return out;
}

export interface RunOptions {
  budget?: Budget;
  seed?: number;
  /** Called as each distinct state is about to be checked (progress). */
  onState?: (category: Category) => void;
}

/** Runs the whole crash harness for one fixture converted to `to`. */
export async function runFixture(fx: Fixture, to: string, opts: RunOptions = {}): Promise<Tally> {
  const t0 = Date.now();
  const b = opts.budget ?? BUDGET;
  const seed = (opts.seed ?? SEED) ^ hashString(`${fx.name}→${to}`);
  const rnd = prng(seed);
  const orig = await originalOf(fx);
  const tally: Tally = {
    pair: pairName(fx, to),
    fixture: fx.name,
    states: Object.fromEntries(CATEGORIES.map((c) => [c, 0])) as Record<Category, number>,
    clearErrors: 0,
    failures: [],
    qemuConfirmed: 0,
    opsRecorded: 0,
    ms: 0,
  };
  const where = `${fx.name} → ${to} (seed ${opts.seed ?? SEED})`;
  let rec: RecordingStorage;
  try {
    const recorded = await recordConversion(fx.files, fx, to);
    rec = recorded.rec;
    const rounds = relocationRounds(recorded.report);
    if (fx.rounds !== undefined && rounds < fx.rounds) tally.failures.push(`${where}: the uncut conversion relocated in ${rounds} rounds, the row is written for at least ${fx.rounds}`);
  } catch (e) {
    if (!(e instanceof UnsupportedError)) throw e;
    tally.refused = e.message;
    tally.ms = Date.now() - t0;
    return tally;
  }
  tally.opsRecorded = rec.log.length;
  const created = createdFiles(rec.initial, rec.live, fx.image);
  if (created.length > 1) tally.failures.push(`${where}: the conversion created ${created.length} files beside the image: ${created.join(', ')}`);
  const companion = created[0];
  // The uncut conversion must itself end as a clean target image.
  const done = await checkState(rec.live, fx, to, orig, false, companion);
  if (!done.ok || done.format !== to) tally.failures.push(`${where}: the uncut conversion: ${done.ok ? `ended as ${done.format}` : done.why}`);
  // Within a format the format name says nothing: the subformat asked for must be there.
  const wanted = fx.options?.[to]?.subformat;
  if (done.ok && wanted !== undefined) {
    const sub = await subformatOf(rec.live, done.image ?? fx.image);
    if (sub !== wanted) tally.failures.push(`${where}: the uncut conversion ended as subformat ${sub}, not ${wanted}`);
  }

  const seen = new Set<string>();
  // States for qemu-img: alternately one in the source format and one in the target format.
  const confirmed: Confirmable[] = [];
  if (done.ok && b.qemuConfirm > 0) confirmed.push({ state: rec.live, label: `${where}: the uncut conversion`, format: to, image: done.image ?? fx.image });
  const check = async (c: Candidate, state: MemoryStorage): Promise<void> => {
    const digest = storageDigest(state);
    if (seen.has(digest)) return;
    seen.add(digest);
    tally.states[c.category]++;
    opts.onState?.(c.category);
    const v = await checkState(state, fx, to, orig, c.garbage, companion);
    if (!v.ok) tally.failures.push(`${c.label}: ${v.why}`);
    else if (v.clearError) tally.clearErrors++;
    else if (confirmed.length < b.qemuConfirm && v.format === (confirmed.length % 2 === 0 ? to : orig.format) && (rnd() < 0.2 || !fx.qemuReadsSource)) {
      confirmed.push({ state, label: c.label, format: v.format, image: v.image ?? fx.image });
    }
  };

  const all = candidatesOf(rec.initial, rec.log, rnd, b, '', where);
  const recoverBases: Candidate[] = [];
  for (const cat of ['kill', 'power', 'power-torn', 'torn', 'garbage'] as Category[]) {
    const mine = all.filter((c) => c.category === cat);
    for (const c of sample(mine, b.perCategory[cat], rnd)) {
      await check(c, c.build());
      if (cat === 'kill' || cat === 'power') recoverBases.push(c);
    }
  }

  // Crashes during recover: record recover's own operations on a state that needs recovery, then
  // crash those (kill at every prefix, power loss at its flushes) and recover again.
  const bases: Files[] = [];
  const baseSeen = new Set<string>();
  for (const c of recoverBases) {
    const s = c.build();
    if (!(await s.exists(journalPath(fx.image)))) continue;
    const dg = storageDigest(s);
    if (baseSeen.has(dg)) continue;
    baseSeen.add(dg);
    bases.push(filesOf(s));
  }
  const recCandidates: Candidate[] = [];
  for (const [k, base] of sample(bases, b.recoverBases, rnd).entries()) {
    const r = new RecordingStorage(base);
    try {
      await recover(fx.image, { drivers: allDrivers, storage: r });
    } catch (e) {
      tally.failures.push(`${where}: recording recover on base ${k}: ${(e as Error).message}`);
      continue;
    }
    recCandidates.push(...candidatesOf(r.initial, r.log, rnd, b, 'recover-', `${where} recover base ${k}:`));
  }
  for (const cat of ['recover-kill', 'recover-power', 'recover-torn'] as Category[]) {
    for (const c of sample(recCandidates.filter((x) => x.category === cat), b.perCategory[cat], rnd)) await check(c, c.build());
  }

  const reference = fx.qemuReadsSource ? null : await (await GuestReader.create(await openImage(fx.image, { drivers: allDrivers, opener: (p, o) => memoryStorageOf(fx.files).open(p, o) }))).read(0, orig.virtualSize);
  tally.qemuConfirmed = confirmWithQemu(fx, orig, confirmed, tally, reference);
  tally.ms = Date.now() - t0;
  return tally;
}

function hashString(s: string): number {
  return createHash('sha256').update(s).digest().readUInt32LE(0);
}

/**
 * Independent confirmation: the state (already recovered and checked by us) is written to real files
 * and judged by qemu-img check and qemu-img compare against the original. QEMU's reference for a
 * source it cannot read itself (a differencing VHD) is the original's guest content as raw bytes, and
 * states still in that format are not confirmed.
 */
interface Confirmable {
  state: MemoryStorage;
  label: string;
  format: string;
  /** The path (in memory) of the valid image: the fixture's image, or a companion file. */
  image: string;
}

function confirmWithQemu(fx: Fixture, orig: Original, states: Confirmable[], tally: Tally, reference: Uint8Array | null): number {
  const failures = tally.failures;
  if (states.length === 0) return 0;
  const tmp = withTmpDir('imgconv-crashq-');
  let n = 0;
  try {
    const write = (files: Files, dir: string, image = fx.image): string => {
      mkdirSync(dir, { recursive: true });
      for (const [p, bytes] of files) writeFileSync(join(dir, p.split('/').pop()!), bytes);
      return join(dir, image.split('/').pop()!);
    };
    let origImage: string;
    let origFormat: string;
    if (reference) {
      origImage = tmp.path('reference.raw');
      writeFileSync(origImage, reference);
      origFormat = 'raw';
    } else {
      origImage = write(fx.files, tmp.path('orig'));
      origFormat = QEMU_FORMAT[orig.format]!;
      if (fx.dataFile !== undefined) {
        // QEMU 7.2 opens a qcow2's relative data file name from its working directory: the original is
        // read once in its own folder, by qemu-img, into the raw reference the states are compared with.
        const reference = tmp.path('reference.raw');
        const r = qemuImgStatus(['convert', '-f', origFormat, '-O', 'raw', origImage, reference], dirname(origImage));
        if (r.status !== 0) {
          failures.push(`${fx.name}: qemu-img convert of the original to a raw reference: ${r.stderr}`);
          return 0;
        }
        origImage = reference;
        origFormat = 'raw';
      }
    }
    for (const [i, { state, label, format, image }] of states.entries()) {
      if (format === orig.format && !fx.qemuReadsSource) continue;
      const img = write(filesOf(state), tmp.path(`s${i}`), image);
      const fmt = QEMU_FORMAT[format]!;
      const chk = qemuImgStatus(['check', '--output=json', '-f', fmt, img], dirname(img));
      if (!/does not support checks/.test(chk.stderr)) {
        const j = JSON.parse(chk.stdout || '{}') as { corruptions?: number; 'check-errors'?: number };
        // qemu 7.2's QED check reports phantom leaks (see test/engine/convert-qed.test.ts); leaks are
        // judged by our exact checker, corruption and errors by qemu.
        if ((j.corruptions ?? 0) !== 0 || (j['check-errors'] ?? 0) !== 0 || chk.status === 1 || chk.status === 2 || !chk.stdout) {
          failures.push(`${label}: qemu-img check (${fmt}) status ${chk.status}: ${chk.stdout}${chk.stderr}`);
          continue;
        }
      }
      const cmp = qemuImgStatus(['compare', '-f', origFormat, '-F', fmt, origImage, img], dirname(img));
      if (cmp.status !== 0) {
        failures.push(`${label}: qemu-img compare (${origFormat} original vs ${fmt} state) status ${cmp.status}: ${cmp.stdout}${cmp.stderr}`);
        continue;
      }
      n++;
    }
  } finally {
    tmp.cleanup();
  }
  return n;
}

/**
 * Where a data file changed in a way its source image would read (null when nowhere): a byte inside the
 * disk that differs from before must now be zero where the original guest disk reads zero.
 */
async function visibleChange(fx: Fixture, orig: Original, before: Uint8Array, after: Uint8Array): Promise<string | null> {
  const chain = await openImage(fx.image, { drivers: allDrivers, opener: (p, o) => memoryStorageOf(fx.files).open(p, o) });
  let guest: Uint8Array;
  try {
    guest = await (await GuestReader.create(chain)).read(0, orig.virtualSize);
  } finally {
    await chain.close();
  }
  const end = Math.min(orig.virtualSize, Math.max(before.length, after.length));
  for (let i = 0; i < end; i++) {
    const was = before[i] ?? 0;
    const now = after[i] ?? 0;
    if (was !== now && (now !== 0 || guest[i] !== 0)) return `byte ${i} was ${was}, is ${now}, the guest disk reads ${guest[i]}`;
  }
  return null;
}

/** What a failed conversion's imageState must mean, checked against the files it left. */
async function truthful(err: ConversionFailedError, state: MemoryStorage, fx: Fixture, to: string, orig: Original, initial: Files, companion: string | undefined): Promise<string | null> {
  const journal = await state.exists(journalPath(fx.image));
  const hasCompanion = companion !== undefined && (await state.exists(companion));
  switch (err.imageState) {
    case 'untouched': {
      if (journal) return 'says untouched but a journal exists';
      if (hasCompanion) return `says untouched but ${companion} was created`;
      for (const [p, b] of initial) {
        const d = state.files.get(p);
        if (!d) return `says untouched but ${p} is gone`;
        const now = d.snapshot();
        if (Buffer.compare(Buffer.from(now), Buffer.from(b)) === 0) continue;
        if (p !== fx.dataFile) return `says untouched but ${p} changed`;
        // An adoption zeroes the data file where the image reads zeros over stale bytes and sets its length
        // before the commit point; the source cannot see that, and README calls the image untouched then.
        // Only such changes, and said in the message.
        const why = await visibleChange(fx, orig, b, now);
        if (why) return `says untouched but the data file ${p} changed where the source reads it: ${why}`;
        if (!err.message.includes(p)) return `says untouched, the data file ${p} changed (invisibly), and the message does not say so: ${err.message}`;
      }
      return null;
    }
    case 'rolled-back':
    case 'converted': {
      if (journal) return `says ${err.imageState} but a journal exists`;
      const want = err.imageState === 'rolled-back' ? orig.format : to;
      if (companion !== undefined && hasCompanion !== (err.imageState === 'converted')) return `says ${err.imageState} but the companion ${companion} ${hasCompanion ? 'exists' : 'does not exist'}`;
      try {
        const d = await describeImage(state, hasCompanion ? companion! : fx.image);
        if (d.format !== want || d.sha !== orig.sha || d.corruptions || d.leaks || d.checkErrors) return `says ${err.imageState} but the image is ${d.format}, content ${d.sha === orig.sha ? 'same' : 'different'}, ${d.corruptions} corruptions, ${d.leaks} leaks`;
      } catch (e) {
        return `says ${err.imageState} but the image does not open: ${(e as Error).message}`;
      }
      return null;
    }
    case 'intermediate': {
      // A two-step conversion stopped between its steps: no journal, a valid image of the intermediate format.
      if (journal) return 'says intermediate but a journal exists';
      try {
        const d = await describeImage(state, fx.image);
        if (d.format === orig.format || d.format === to || d.sha !== orig.sha || d.corruptions || d.leaks || d.checkErrors) return `says intermediate but the image is ${d.format}, content ${d.sha === orig.sha ? 'same' : 'different'}, ${d.corruptions} corruptions, ${d.leaks} leaks`;
      } catch (e) {
        return `says intermediate but the image does not open: ${(e as Error).message}`;
      }
      return null;
    }
    case 'needs-recover':
      // Truthful when recover has something to do, or the image is valid as it is.
      if (journal) return null;
      try {
        const d = await describeImage(state, hasCompanion ? companion! : fx.image);
        if ((d.format === orig.format || d.format === to) && d.sha === orig.sha) return null;
      } catch {
        /* falls through */
      }
      return 'says needs-recover but there is no journal and the image is not valid';
  }
}

/**
 * Faults: EIO and ENOSPC at every faultable operation of the conversion (reads included for EIO),
 * once and persistently. The conversion must fail with a ConversionFailedError whose imageState is
 * truthful; then, with the disk working again, the usual check after recover must hold.
 */
export async function runFaults(fx: Fixture, to: string, tally: Tally, opts: RunOptions = {}): Promise<void> {
  if (tally.refused) return;
  const b = opts.budget ?? BUDGET;
  const rnd = prng(((opts.seed ?? SEED) ^ hashString(`faults ${fx.name}→${to}`)) >>> 0);
  const orig = await originalOf(fx);
  const counts: Record<FaultCode, number> = { EIO: 0, ENOSPC: 0 };
  let companion: string | undefined;
  for (const code of ['EIO', 'ENOSPC'] as FaultCode[]) {
    const disk = memoryStorageOf(fx.files);
    const dry = new FaultyStorage(disk, code, -1, false);
    await convertInPlace(fx.image, { to, format: fx.format, drivers: allDrivers, storage: dry, ...optionsFor(fx, to) });
    counts[code] = dry.count;
    companion = createdFiles(fx.files, disk, fx.image)[0];
  }
  const runs: { code: FaultCode; at: number; persistent: boolean }[] = [];
  for (const code of ['EIO', 'ENOSPC'] as FaultCode[]) for (let at = 0; at < counts[code]; at++) for (const persistent of [false, true]) runs.push({ code, at, persistent });
  for (const r of sample(runs, b.perCategory.fault, rnd)) {
    const label = `${fx.name} → ${to}: ${r.code} ${r.persistent ? 'from' : 'at'} operation ${r.at}`;
    const disk = memoryStorageOf(fx.files);
    const faulty = new FaultyStorage(disk, r.code, r.at, r.persistent);
    tally.states.fault++;
    opts.onState?.('fault');
    let err: unknown;
    try {
      await convertInPlace(fx.image, { to, format: fx.format, drivers: allDrivers, storage: faulty, ...optionsFor(fx, to) });
    } catch (e) {
      err = e;
    }
    if (!(err instanceof ConversionFailedError)) {
      tally.failures.push(`${label} (hit ${faulty.hit}): ${err === undefined ? 'the conversion succeeded despite the fault' : `threw ${(err as Error).name} instead of ConversionFailedError: ${(err as Error).message}`}`);
      // Still: the files must recover.
    } else {
      const lie = await truthful(err, disk, fx, to, orig, fx.files, companion);
      if (lie) tally.failures.push(`${label} (hit ${faulty.hit}): imageState ${lie}`);
    }
    const v = await checkState(disk, fx, to, orig, false, companion);
    if (!v.ok) tally.failures.push(`${label} (hit ${faulty.hit}): after recover: ${v.why}`);
  }
}
