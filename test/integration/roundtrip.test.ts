/**
 * Every qcow2 and QED image of the fixture matrix converts in place to the other format and back,
 * judged by qemu-img after each step: compare identical to the original (backing chains included),
 * check clean, info probing the new format with the virtual size unchanged. Images holding what a
 * conversion cannot carry (internal snapshots) are refused byte-identical; qcow2 with an external data file
 * goes to QED in two steps (the data file is adopted as the raw disk, which then becomes the QED).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace } from '../../src/engine/convert.js';
import { ImgconvError } from '../../src/errors.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { generateMatrix, isProbeTrap, listMatrix, type MatrixRow } from './matrix.js';

const run = qemuAvailable();
const tmp = withTmpDir('imgconv-roundtrip-');
afterAll(() => tmp.cleanup());
let rows: MatrixRow[] = [];
beforeAll(() => {
  if (run) rows = generateMatrix(tmp.dir);
}, 120_000);

/** Refused by design, with the words the refusal must contain. */
const REFUSED: Record<string, RegExp> = {
  'qcow2-snapshot': /internal snapshots/,
};

/**
 * Images whose data lives in an external data file: the conversion adopts that file (it becomes the image,
 * src/engine/adopt.ts), so they run on a copy of both files in a directory of their own, and qemu-img opens
 * the original from its directory (QEMU 7.2 resolves a relative data file name from the working directory).
 */
const DATA_FILE: Record<string, string> = {
  'qcow2-datafile': 'qcow2-datafile.data',
  'qcow2-datafile-raw': 'qcow2-datafile-raw.data',
};

const other = (f: string) => (f === 'qcow2' ? 'qed' : 'qcow2');
const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

/** qemu-img check problems, allowing QEMU 7.2's QED phantom leaks (a miscount; see convert-qed.test.ts). */
function checkProblems(path: string, format: string): string | null {
  const r = qemuImgStatus(['check', '--output=json', '-f', format, path]);
  const j = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number; 'cluster-size'?: number };
  let phantom = 0;
  if (format === 'qed') {
    const cs = (JSON.parse(qemuImg(['info', '--output=json', '-f', 'qed', path])) as { 'cluster-size': number })['cluster-size'];
    phantom = Math.floor(Math.floor(statSync(path).size / cs) / (cs - 1));
  }
  if ((j.corruptions ?? 0) || (j['check-errors'] ?? 0) || (j.leaks ?? 0) !== phantom) return `qemu-img check: ${r.stdout}`;
  if (format === 'qcow2' && r.status !== 0) return `qemu-img check exit ${r.status}`;
  return null;
}

describe.runIf(run)('qcow2 ⇄ QED round trips over the fixture matrix', () => {
  const names = listMatrix().filter((r) => (r.imgconvFormat === 'qcow2' || r.imgconvFormat === 'qed') && !isProbeTrap(r));
  it('covers every qcow2 and QED fixture', () => {
    expect(names.length).toBeGreaterThanOrEqual(25);
  });
  for (const n of names) {
    it(n.name, async () => {
      const row = rows.find((r) => r.name === n.name)!;
      const orig = join(tmp.dir, row.path);
      // Work on a sparse copy beside the original, so relative backing names still resolve.
      let img = `${orig}.rt`;
      const dataFile = DATA_FILE[row.name];
      if (dataFile !== undefined) {
        const own = join(tmp.dir, `${row.name}.rt`);
        mkdirSync(own, { recursive: true });
        execFileSync('cp', ['--sparse=always', join(tmp.dir, dataFile), orig, own]);
        img = join(own, row.path);
      } else execFileSync('cp', ['--sparse=always', orig, img]);
      const from = row.imgconvFormat;
      const refusal = REFUSED[row.name];
      if (refusal) {
        const before = sha(img);
        const err = await convertInPlace(img, { to: other(from), format: from, drivers: allDrivers }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(ImgconvError);
        expect((err as Error).message).toMatch(refusal);
        expect(sha(img)).toBe(before);
        return;
      }
      const vsize = (JSON.parse(qemuImg(['info', '--output=json', '-f', row.qemuFormat, orig])) as { 'virtual-size': number })['virtual-size'];
      for (const to of [other(from), from]) {
        const r = await convertInPlace(img, { to, drivers: allDrivers });
        const info = JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string; 'virtual-size': number };
        expect(info.format, `${row.name} → ${to}`).toBe(to);
        expect(info['virtual-size']).toBe(vsize);
        const cmp = qemuImgStatus(['compare', '-f', row.qemuFormat, '-F', to, orig, img], dirname(orig));
        expect(cmp.status, `${row.name} → ${to}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
        expect(checkProblems(img, to), `${row.name} → ${to}`).toBeNull();
        expect(r.verified).toContain('guest mapping identical');
        // A data-file qcow2 → QED went in two steps: its data file was adopted (it is the image now).
        if (dataFile !== undefined && to !== from) {
          expect(r.steps?.map((s) => s.target.format)).toEqual(['raw', to]);
          expect(existsSync(join(dirname(img), dataFile))).toBe(false);
        }
      }
    }, 120_000);
  }
});
