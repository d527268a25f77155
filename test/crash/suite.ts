/**
 * One vitest suite per source format (so the forks pool spreads the formats over the cores): for each
 * fixture of that format and each target, the crash harness and the fault injection, with the states
 * checked per pair printed, and — under `npm run crash:full` — the table in test/crash-report.md.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { qemuAvailable } from '../support/qemu.js';
import { SPECS, buildFixtures, fixtureSet, withinFormatTargets, type Fixture } from './fixtures.js';
import { BUDGET, CATEGORIES, FULL, SEED, pairName, runFaults, runFixture, type Category, type Tally } from './harness.js';

const root = join(import.meta.dirname, '..', '..');
const REPORT = join(root, 'test', 'crash-report.md');
/** Per-format results of the latest run, merged into the report by whichever suite ends last. */
const PARTS = join(root, 'test', 'crash-report.md.tmp');

/** The formats that can be converted to, as the registry says now (a VMDK target counts once it exists). */
export function targetFormats(): string[] {
  return allDrivers.filter((d) => d.target).map((d) => d.name);
}

/**
 * A time bound for the full run on a shared two-core machine (IMGCONV_CRASH_QUOTA; unset: none): every
 * base fixture runs (they hold the data under a header, the backing file and the relocation each pair
 * must cover); an extra fixture runs only while its pair has fewer distinct states than the quota.
 * Each fixture that runs gets the whole generator; the report lists the ones left out.
 */
const QUOTA = process.env.IMGCONV_CRASH_QUOTA ? Number(process.env.IMGCONV_CRASH_QUOTA) : Infinity;
/**
 * IMGCONV_CRASH_FIXTURES=name,name@variant: only these fixtures (e.g. new rows run in full by themselves).
 * Such a run prints its tallies and leaves test/crash-report.md alone: the report is of whole runs.
 */
const ONLY = process.env.IMGCONV_CRASH_FIXTURES ? new Set(process.env.IMGCONV_CRASH_FIXTURES.split(',')) : undefined;
const BASE_FIXTURES = new Set(SPECS.map((s) => s.name));
const statesOf = (t: Tally) => CATEGORIES.reduce((s, c) => s + t.states[c], 0);

/** Whether the suite converts `fx` to `to`: its named targets, or every other format when it names none. */
function convertsTo(fx: Fixture, to: string): boolean {
  return fx.targets ? fx.targets.includes(to) : to !== fx.format;
}

export function definePairSuite(source: string): void {
  const run = qemuAvailable();
  describe.runIf(run)(`crash states: ${source} sources`, () => {
    let fixtures: Fixture[] = [];
    const tallies: Tally[] = [];
    // Building hundreds of fixtures with qemu-img (the full set's families) takes minutes on a loaded machine.
    beforeAll(() => {
      fixtures = buildFixtures(source, undefined, ONLY);
    }, FULL ? 3600_000 : 120_000);

    it.skipIf(ONLY !== undefined)('has at least three fixtures (two in the extra set alone, any number in the more set)', () => {
      // The 'more' set is a supplement for a few pairs: a source format may have none there.
      expect(fixtures.length).toBeGreaterThanOrEqual({ base: 3, all: 3, extra: 2, more: 0 }[fixtureSet()]);
    });

    // Other formats, and the source's own format where a fixture asks for a subformat change.
    for (const to of [...targetFormats().filter((t) => t !== source), ...withinFormatTargets(source)]) {
      it(
        `${source} → ${to}: every crash and fault state recovers to one valid image`,
        async () => {
          for (const fx of fixtures) {
            // Fixtures added for the short pairs name their targets (fixtures.ts, Spec.targets).
            if (!convertsTo(fx, to)) continue;
            const had = tallies.filter((x) => x.pair === pairName(fx, to)).reduce((n, x) => n + statesOf(x), 0);
            if (!BASE_FIXTURES.has(fx.name) && had >= QUOTA) {
              tallies.push({ pair: pairName(fx, to), fixture: fx.name, states: Object.fromEntries(CATEGORIES.map((c) => [c, 0])) as Record<Category, number>, clearErrors: 0, failures: [], qemuConfirmed: 0, opsRecorded: 0, ms: 0, skipped: `the pair already had ${had} states (quota ${QUOTA})` });
              continue;
            }
            const t = await runFixture(fx, to);
            await runFaults(fx, to, t);
            tallies.push(t);
            if (FULL) console.log(`${fx.name} → ${to}: ${CATEGORIES.reduce((s, c) => s + t.states[c], 0)} states, ${t.failures.length} failures, ${(t.ms / 1000).toFixed(0)} s`);
            if (t.refused) {
              console.log(`${fx.name} → ${to}: refused by the target, not a crash case: ${t.refused}`);
              continue;
            }
            const total = CATEGORIES.reduce((s, c) => s + t.states[c], 0);
            // The sample must actually cover each kind of crash on each fixture.
            expect(t.states.kill, `${fx.name} → ${to}: kill states`).toBeGreaterThan(0);
            expect(t.states.power + t.states.torn + t.states.garbage + t.states.fault, `${fx.name} → ${to}: other states`).toBeGreaterThan(0);
            expect(t.failures, `${fx.name} → ${to}: ${t.failures.length} of ${total} states failed:\n${t.failures.slice(0, 12).join('\n')}`).toEqual([]);
          }
          // A pair is covered only when most of its fixtures convert (targets may refuse a backing
          // format they cannot reference).
          const names = new Set(fixtures.filter((f) => convertsTo(f, to)).map((f) => pairName(f, to)));
          // (or one, when it alone gave the pair its quota of states and the rest were not run).
          for (const pair of names) {
            const ran = tallies.filter((t) => t.pair === pair && !t.refused && !t.skipped);
            const enough = ran.reduce((n, t) => n + statesOf(t), 0) >= QUOTA;
            // A subformat row (" -o ") has one fixture per source in the full run's relocating cases; a
            // row of its own kind (a relocation window, a data-file source) may have just one fixture.
            const defined = fixtures.filter((f) => convertsTo(f, to) && pairName(f, to) === pair).length;
            expect(ran.length, pair).toBeGreaterThanOrEqual(fixtureSet() === 'extra' || enough || pair.includes(' -o ') ? 1 : Math.min(2, defined));
          }
        },
        FULL ? 4 * 3600_000 : 120_000,
      );
    }

    afterAll(() => {
      if (tallies.length === 0) return;
      const pairs = new Map<string, Tally[]>();
      for (const t of tallies) pairs.set(t.pair, [...(pairs.get(t.pair) ?? []), t]);
      for (const [pair, ts] of pairs) {
        const by = (c: Category) => ts.reduce((s, t) => s + t.states[c], 0);
        const total = CATEGORIES.reduce((s, c) => s + by(c), 0);
        console.log(
          `crash states checked, ${pair}: ${total} (${CATEGORIES.map((c) => `${c} ${by(c)}`).join(', ')}; qemu-confirmed ${ts.reduce((s, t) => s + t.qemuConfirmed, 0)}) over ${ts.length} fixtures, ${ts.reduce((s, t) => s + t.failures.length, 0)} failures, ${(ts.reduce((s, t) => s + t.ms, 0) / 1000).toFixed(1)} s, seed ${SEED}${FULL ? ', full set' : ', CI sample'}`,
        );
      }
      if (!FULL || ONLY) return;
      mkdirSync(PARTS, { recursive: true });
      // One part per source format and fixture set: a run of the extra set adds to the base set's.
      writeFileSync(join(PARTS, `${source}-${fixtureSet()}.json`), JSON.stringify({ source, set: fixtureSet(), seed: SEED, at: new Date().toISOString(), budget: BUDGET, quota: QUOTA, tallies }, (_k, v) => (v === Infinity ? 'all' : v), 2));
      writeReport();
    });
  });
}

interface Part {
  source: string;
  set?: string;
  seed: number;
  at: string;
  quota?: number | string;
  tallies: Tally[];
}

/** test/crash-report.md from every per-format part present. */
export function writeReport(): void {
  const parts: Part[] = readdirSync(PARTS)
    .filter((f) => f.endsWith('.json'))
    .map((f) => JSON.parse(readFileSync(join(PARTS, f), 'utf8')) as Part)
    .sort((a, b) => a.source.localeCompare(b.source));
  const all = parts.flatMap((p) => p.tallies);
  const pairs = [...new Set(all.map((t) => t.pair))];
  const sum = (ts: Tally[], f: (t: Tally) => number) => ts.reduce((s, t) => s + f(t), 0);
  const states = (t: Tally) => CATEGORIES.reduce((s, c) => s + t.states[c], 0);
  const lines = [
    '# Crash-consistency report',
    '',
    'Written by `npm run crash:full` (test/crash/). Each state is a distinct set of file contents',
    '(duplicates are counted once), checked as described in test/crash/harness.ts: after `recover` the',
    'image is exactly one valid image (source or target format) with the original virtual size and',
    'guest SHA-256, a clean check (no corruption, leak or error), no journal, and a second `recover`',
    'changes nothing. Faults are whole conversions with EIO/ENOSPC injected at one operation (once or',
    'from then on), judged on the truthfulness of the error and then like a crash state.',
    '',
    'Row names: `-o k=v` is a target subformat; "(relocation window N KiB)" a conversion run with',
    '`relocationWindow` of a few clusters (moves relocate in several rounds, a QED target compacts in batches);',
    'a source in parentheses ("qcow2 (data_file_raw=on)", "vmdk (monolithicFlat)") keeps its data in a file',
    'beside the image, which the conversion adopts as the raw disk: once the image is the target that file',
    'must be gone, and an adoption that fails saying `untouched` may have changed it only where the image reads zeros.',
    '',
    `Runs (source format, fixture set, seed, finished): ${parts.map((p) => `${p.source} ${p.set ?? 'base'} ${p.seed} ${p.at}`).join('; ')}.`,
    ...(parts.some((p) => p.quota !== undefined && p.quota !== 'all')
      ? ['', `Quota (IMGCONV_CRASH_QUOTA): every base fixture ran; an extra fixture ran only while its pair had fewer than ${[...new Set(parts.map((p) => p.quota))].join('/')} distinct states (the rest are marked "not run" below). Every fixture that ran got the whole generator.`]
      : []),
    '',
    `| pair | states | failures | ${CATEGORIES.join(' | ')} | garbage → clear error | qemu-img confirmed | time |`,
    `|---|---:|---:|${CATEGORIES.map(() => '---:|').join('')}---:|---:|---:|`,
  ];
  for (const pair of pairs) {
    const ts = all.filter((t) => t.pair === pair);
    const c = (k: Category) => sum(ts, (t) => t.states[k]);
    lines.push(
      `| ${pair} | ${sum(ts, states)} | ${sum(ts, (t) => t.failures.length)} | ${CATEGORIES.map((k) => c(k)).join(' | ')} | ${sum(ts, (t) => t.clearErrors)} | ${sum(ts, (t) => t.qemuConfirmed)} | ${(sum(ts, (t) => t.ms) / 1000).toFixed(0)} s |`,
    );
  }
  const short = pairs.map((p) => [p, sum(all.filter((t) => t.pair === p), states)] as const).filter(([, n]) => n < 10_000);
  if (short.length) {
    lines.push(
      '',
      `Pairs below 10,000 distinct states: ${short.map(([p, n]) => `${p} (${n})`).join(', ')}. Their conversions are short (16–60 operations, few multi-sector writes), so the full generator — every kill prefix, every subset of ≤ 10 unflushed operations, every torn mask of ≤ 8 sectors, a garbage variant of every sector, recover's own log crashed — yields fewer distinct file states; more would need more fixtures, not more sampling of the same states.`,
    );
  }
  lines.push('', '## Per fixture', '', '| pair | fixture | operations recorded | states | failures | note |', '|---|---|---:|---:|---:|---|');
  for (const t of all) lines.push(`| ${t.pair} | ${t.fixture} | ${t.opsRecorded} | ${states(t)} | ${t.failures.length} | ${t.skipped ? `not run: ${t.skipped}` : t.refused ? `refused by the target: ${t.refused.replace(/\|/g, '/')}` : ''} |`);
  const failures = all.flatMap((t) => t.failures);
  if (failures.length) lines.push('', '## Failures (first 50)', '', ...failures.slice(0, 50).map((f) => `- ${f}`));
  writeFileSync(REPORT, lines.join('\n') + '\n');
}

