/**
 * The benchmark's smoke run (`node dist/bench/run.js --smoke`): every section runs on tiny images once.
 * Nothing is timed as pass/fail here — the test checks that the run succeeds, writes its report to a
 * temporary file (never BENCHMARKS.md), that every section is there with its tables, that every figure
 * parses as a number (median (min–max) ordered), and that the converted images matched their sources.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { allDrivers } from '../drivers/index.js';
import { HEADINGS, SECTION_NAMES } from '../bench/context.js';
import { conversionLabel } from '../bench/conversion.js';
import { INPLACE_CONVERSIONS } from '../bench/inplace.js';
import { MOVING_CONVERSIONS } from '../bench/moving.js';
import { qemuAvailable } from './support/qemu.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const RUN = join(ROOT, 'dist', 'bench', 'run.js');

/** Columns that hold words; every other column must hold figures. */
const TEXT_COLUMNS = new Set(['', 'image', 'conversion', 'tool', 'command', 'virtual size', 'sizes', 'target', 'measured', 'met', 'shortfall', 'qemu-img compare', 'route']);
const FIGURE = /^-?\d+(?:\.\d+)?$/;
const FIGURE_RANGE = /^(-?\d+(?:\.\d+)?) \((-?\d+(?:\.\d+)?)–(-?\d+(?:\.\d+)?)\)$/;

interface Table {
  header: string[];
  rows: string[][];
}

function cells(line: string): string[] {
  return line.replace(/^\|/, '').replace(/\|$/, '').split('|').map((c) => c.trim());
}

/** The markdown tables of one section's text. */
function tablesOf(text: string): Table[] {
  const out: Table[] = [];
  const lines = text.split('\n');
  for (let i = 0; i + 1 < lines.length; i++) {
    if (!lines[i]!.startsWith('|') || !/^\|( --- \|)+$/.test(lines[i + 1]!)) continue;
    const t: Table = { header: cells(lines[i]!), rows: [] };
    for (i += 2; i < lines.length && lines[i]!.startsWith('|'); i++) t.rows.push(cells(lines[i]!));
    out.push(t);
  }
  return out;
}

function sectionText(report: string, heading: string): string {
  const start = report.indexOf(`\n${heading}\n`);
  if (start < 0) return '';
  const next = report.indexOf('\n## ', start + heading.length + 2);
  return report.slice(start, next < 0 ? undefined : next);
}

const haveQemu = qemuAvailable();

describe.skipIf(!haveQemu)('bench --smoke', () => {
  let report = '';
  let reportPath = '';

  beforeAll(async () => {
    if (!existsSync(RUN)) spawnSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.json')], { stdio: 'ignore' });
    expect(existsSync(RUN), `${RUN} missing: build with npx tsc -p .`).toBe(true);
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((done, fail) => {
      const child = spawn(process.execPath, [RUN, '--smoke'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let o = '';
      let e = '';
      child.stdout.on('data', (d: Buffer) => (o += d.toString()));
      child.stderr.on('data', (d: Buffer) => (e += d.toString()));
      child.on('error', fail);
      child.on('close', (c) => done({ code: c ?? -1, stdout: o, stderr: e }));
    });
    expect(code, stderr).toBe(0);
    reportPath = stdout.trim().split('\n').pop()!;
    report = readFileSync(reportPath, 'utf8');
  }, 600_000);

  afterAll(() => {
    if (reportPath) rmSync(reportPath, { force: true });
  });

  test('writes to a temporary file, not BENCHMARKS.md', () => {
    expect(resolve(reportPath).startsWith(resolve(tmpdir()))).toBe(true);
    expect(reportPath.endsWith('BENCHMARKS.md')).toBe(false);
    expect(report).toContain('SMOKE RUN');
  });

  test('has every section, each run', () => {
    for (const heading of Object.values(HEADINGS)) expect(report.split('\n')).toContain(heading);
    expect(report).not.toContain('Not run in this report');
  });

  test('the machine is described', () => {
    const [t] = tablesOf(sectionText(report, HEADINGS.machine));
    const facts = new Map(t!.rows.map((r) => [r[0], r[1]]));
    for (const k of ['CPU', 'cores', 'memory', 'file system (scratch directory)', 'kernel', 'qemu-img']) {
      expect(facts.get(k), k).toBeTruthy();
      expect(facts.get(k)).not.toBe('unknown');
    }
    expect(Number(facts.get('cores'))).toBeGreaterThan(0);
    expect(facts.get('qemu-img')).toMatch(/qemu-img version \d+\.\d+/);
  });

  test('every figure parses, ranges are ordered', () => {
    let figures = 0;
    for (const t of tablesOf(report)) {
      for (const row of t.rows) {
        row.forEach((cell, i) => {
          const column = t.header[i]!;
          if (TEXT_COLUMNS.has(column) || cell === '—') return;
          const range = FIGURE_RANGE.exec(cell);
          if (range) {
            const [median, min, max] = [Number(range[1]), Number(range[2]), Number(range[3])];
            expect(min, `${column}: ${cell}`).toBeLessThanOrEqual(median);
            expect(median, `${column}: ${cell}`).toBeLessThanOrEqual(max);
          } else expect(cell, `column "${column}" of ${row.join(' | ')}`).toMatch(FIGURE);
          expect(Number.isFinite(Number(range ? range[1] : cell))).toBe(true);
          figures++;
        });
      }
    }
    expect(figures).toBeGreaterThan(100);
  });

  test('the sections measure every in-place target the issue names', () => {
    const labels = (cs: readonly { from: string; to: string; options?: Record<string, string> }[]) => cs.map((c) => `${c.from}>${c.to}${c.options ? JSON.stringify(c.options) : ''}`);
    expect(labels(INPLACE_CONVERSIONS)).toEqual(
      expect.arrayContaining(['qcow2>qed', 'qed>qcow2', 'qcow2>vmdk', 'qed>vmdk', 'raw>vhd{"subformat":"fixed"}', 'raw>vmdk{"subformat":"monolithicFlat"}', 'raw>qcow2{"data_file_raw":"on"}']),
    );
    expect(labels(MOVING_CONVERSIONS)).toEqual(expect.arrayContaining(['qcow2>qed', 'qed>raw', 'raw>vhd', 'qcow2>raw', 'qcow2>vhd']));
  });

  test('each section has its tables and rows', () => {
    const rowsOf = (heading: string) => tablesOf(sectionText(report, heading)).map((t) => t.rows.length);
    expect(rowsOf(HEADINGS.startup)).toEqual([4]);
    // one size × each conversion × two tools; then the derived table
    const n = INPLACE_CONVERSIONS.length;
    expect(rowsOf(HEADINGS.inplace)).toEqual([2 * n, n]);
    // two sizes × two conversions; growth per conversion; phases
    expect(rowsOf(HEADINGS.scale)).toEqual([4, 2, 4]);
    // each conversion × imgconv, qemu-img convert, cp; plan beside measurement; phases
    const m = MOVING_CONVERSIONS.length;
    expect(rowsOf(HEADINGS.moving)).toEqual([3 * m, m, m]);
    const [measured] = tablesOf(sectionText(report, HEADINGS.moving));
    expect(measured!.rows.map((r) => r[1]!.split(' ')[0])).toEqual(MOVING_CONVERSIONS.flatMap(() => ['imgconv', 'qemu-img', 'cp']));
    for (const s of SECTION_NAMES) expect(sectionText(report, HEADINGS[s]).length).toBeGreaterThan(0);
  });

  test('converted images matched their sources; every registered target is accounted for', () => {
    const inplace = sectionText(report, HEADINGS.inplace);
    const [, derived] = tablesOf(inplace);
    const col = derived!.header.indexOf('qemu-img compare');
    expect(derived!.rows.map((r) => r[1])).toEqual(INPLACE_CONVERSIONS.map(conversionLabel));
    expect(derived!.rows.map((r) => r[col])).toEqual(INPLACE_CONVERSIONS.map(() => 'identical'));
    const [, planned] = tablesOf(sectionText(report, HEADINGS.moving));
    const mcol = planned!.header.indexOf('qemu-img compare');
    expect(planned!.rows.map((r) => r[0])).toEqual(MOVING_CONVERSIONS.map(conversionLabel));
    expect(planned!.rows.map((r) => r[mcol])).toEqual(MOVING_CONVERSIONS.map(() => 'identical'));
    // Every format of the registry is listed: measured (naming the conversions), or why not.
    for (const d of allDrivers) {
      const line = new RegExp(`^- \\*\\*${d.name}\\*\\*: (.*)$`, 'm').exec(inplace);
      expect(line, d.name).not.toBeNull();
      if (d.target) expect(line![1]).toMatch(/^measured: /);
      else expect(line![1]).toMatch(/^not an in-place target/);
    }
    expect(inplace).not.toMatch(/not benchmarked here|not yet available/);
  });

  test('every target is reported, met or with its shortfall', () => {
    const [t] = tablesOf(sectionText(report, HEADINGS.targets));
    // in place: 2 per conversion at the largest size; scale: < 5 s, RSS, time growth, memory growth per
    // conversion; moving: throughput per conversion
    expect(t!.rows.length).toBe(2 * INPLACE_CONVERSIONS.length + 8 + MOVING_CONVERSIONS.length);
    for (const [target, measured, met, shortfall] of t!.rows) {
      expect(target).toBeTruthy();
      expect(measured).toMatch(/\d/);
      expect(['yes', 'no']).toContain(met);
      if (met === 'no') expect(shortfall).toMatch(/\d/);
      else expect(shortfall).toBe('—');
    }
  });
});
