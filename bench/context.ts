/** What every section gets: the configuration, the tools' paths, and shared helpers. */
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ConversionPlan } from '../src/engine/convert.js';
import type { LayoutStats, PhaseTimes } from './child.js';
import { measure, run, type Measurement, type MeasureOptions } from './measure.js';

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (this file runs from dist/bench/). */
export const ROOT = resolve(here, '..', '..');
export const IMGCONV = join(ROOT, 'bin', 'imgconv');
const CHILD = join(here, 'child.js');

export interface Config {
  smoke: boolean;
  /** Where the report goes. */
  out: string;
  /** Scratch directory for images (removed at the end). */
  dir: string;
  /** Runs per measured figure. */
  runs: number;
  inplaceSizes: number[];
  scaleSizes: number[];
  /** Guest bytes of the moving section's images. */
  movingBytes: number;
  startupRuns: number;
  sections: Set<SectionName>;
}

export const SECTION_NAMES = ['startup', 'inplace', 'scale', 'moving'] as const;
export type SectionName = (typeof SECTION_NAMES)[number];

/** The report's section headings (the smoke test checks each is there). */
export const HEADINGS: Record<SectionName | 'machine' | 'method' | 'targets', string> = {
  machine: '## Machine',
  method: '## How it is measured',
  startup: '## Start-up',
  inplace: '## In place: fully allocated random data',
  scale: '## Scale: every cluster mapped',
  moving: '## Moving conversions: data that must move',
  targets: '## Targets',
};

export function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

export function imgconv(args: string[], opts: MeasureOptions = {}): Promise<Measurement> {
  return measure(process.execPath, [IMGCONV, ...args], opts);
}

/** `imgconv plan`; `options` is the target's `-o`, as key/value pairs. */
export async function plan(image: string, to: string, options: Record<string, string> = {}): Promise<ConversionPlan> {
  const o = Object.entries(options).flatMap(([k, v]) => ['-o', `${k}=${v}`]);
  return JSON.parse(await run(process.execPath, [IMGCONV, 'plan', image, '--to', to, ...o, '--output', 'json'])) as ConversionPlan;
}

/** `options`: the target's `-o` as one "k=v,k=v" string (may be empty). */
export async function phaseTimes(image: string, to: string, options = ''): Promise<PhaseTimes> {
  return JSON.parse(await run(process.execPath, [CHILD, 'phases', image, to, ...(options ? [options] : [])])) as PhaseTimes;
}

export async function layoutStats(image: string): Promise<LayoutStats> {
  return JSON.parse(await run(process.execPath, [CHILD, 'layout', image])) as LayoutStats;
}

export function journalOf(image: string): string {
  return `${image}.imgconv-journal`;
}

/** Bytes the plan says a conversion writes: new metadata, data moved before the commit, and compaction. */
export function plannedBytes(p: ConversionPlan): number {
  return p.metadataBytes + p.dataMoveBytes + p.compactionMoveBytes;
}

/** A figure for the Targets section: the target in words, what was measured, and whether it is met. */
export interface TargetResult {
  target: string;
  measured: string;
  met: boolean;
  /** When missed: by how much, in words with the numbers. */
  shortfall?: string;
}
