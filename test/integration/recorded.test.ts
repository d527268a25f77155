/**
 * The committed small fixture set (fixtures/small, made by `fixtures/generate.sh fixtures/small
 * --small`) against qemu-img's answers recorded next to it: runs without qemu. Git keeps no holes,
 * so the images are first copied into a temporary folder with the same canonical holes the
 * generator dug before recording (every aligned all-zero 4 KiB block).
 */
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseMapJson } from '../support/qemu-map.js';
import { withTmpDir } from '../support/qemu.js';
import { compareFixture, digestKindFor, isProbeTrap, listMatrix, open, parseMatrix, probeTrapProblem, SMALL_DIR, sparseCopyDir } from './matrix.js';

const rows = parseMatrix(readFileSync(join(SMALL_DIR, 'matrix.tsv'), 'utf8'));
const expected = (name: string, ext: string) => readFileSync(join(SMALL_DIR, 'expected', `${name}.${ext}`), 'utf8');

describe('committed small fixtures against recorded qemu-img answers', () => {
  let tmp: ReturnType<typeof withTmpDir>;

  beforeAll(() => {
    tmp = withTmpDir('imgconv-recorded-');
    sparseCopyDir(SMALL_DIR, tmp.dir);
  });

  afterAll(() => tmp?.cleanup());

  it('is the set generate.sh --small describes, with every answer recorded, under 2 MiB', () => {
    expect(rows.map((r) => r.name)).toEqual(listMatrix(true).map((r) => r.name));
    expect(rows.length).toBeGreaterThanOrEqual(10);
    // The recorded digest is a plain SHA-256: every committed image must stay under the limit.
    for (const r of rows) expect(digestKindFor(JSON.parse(expected(r.name, 'info.json'))['virtual-size'] as number)).toBe('sha256');
    let total = 0;
    for (const f of readdirSync(SMALL_DIR)) {
      const st = statSync(join(SMALL_DIR, f));
      if (st.isFile()) total += st.size;
    }
    for (const f of readdirSync(join(SMALL_DIR, 'expected'))) total += statSync(join(SMALL_DIR, 'expected', f)).size;
    expect(total).toBeLessThan(2 * 1024 * 1024);
    for (const r of rows) for (const ext of ['info.json', 'map.json', 'sha256']) expect(() => expected(r.name, ext), `${r.name}.${ext}`).not.toThrow();
  });

  for (const row of rows) {
    it(row.name, async () => {
      const info = JSON.parse(expected(row.name, 'info.json')) as Record<string, unknown>;
      expect(info.format, 'recorded qemu format').toBe(row.qemuFormat);
      const problems = await compareFixture(row, join(tmp.dir, row.path), {
        virtualSize: info['virtual-size'] as number,
        map: parseMapJson(expected(row.name, 'map.json')),
        info,
        digest: Promise.resolve(expected(row.name, 'sha256').trim()),
      });
      if (problems.length) expect.fail(`${row.name} (${row.notes}):\n${problems.join('\n')}`);
    });
  }

  for (const row of rows.filter(isProbeTrap)) {
    it(`${row.name}: probing gives raw or an error naming -f raw; -f raw opens it`, async () => {
      const file = join(tmp.dir, row.path);
      expect(await probeTrapProblem(file)).toBeNull();
      const chain = await open(file, 'raw');
      try {
        expect(chain.layers[0]!.format).toBe('raw');
      } finally {
        await chain.close();
      }
    });
  }
});
