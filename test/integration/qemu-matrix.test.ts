/**
 * The fixture matrix against the real qemu-img: every image fixtures/generate.sh builds is opened
 * by imgconv (probing, with every registered driver) and must agree with QEMU on format, virtual
 * size, the info fields both print (cluster size, backing file and format, dirty flag), normalised
 * map, guest content (SHA-256 of `qemu-img convert -O raw`; a chunked digest above 1 GiB) and a
 * clean check.
 * Fixtures of formats whose driver is not registered yet fail here, by design.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { diffMaps, parseMapJson } from '../support/qemu-map.js';
import { qemuAvailable, qemuGuestDigest, qemuImgStatus, qemuInfoJson, qemuMapText, withTmpDir } from '../support/qemu.js';
import { compareFixture, digestKindFor, generateMatrix, isProbeTrap, listMatrix, open, probeTrapProblem, REPO, type MatrixRow } from './matrix.js';

// Names are needed when the tests are collected, before beforeAll builds anything.
const rows = listMatrix();
const haveQemu = qemuAvailable();

describe.skipIf(!haveQemu)('qemu-img fixture matrix', () => {
  let tmp: ReturnType<typeof withTmpDir>;
  let dir = '';

  beforeAll(() => {
    tmp = withTmpDir('imgconv-matrix-');
    dir = join(tmp.dir, 'fixtures');
    const built = generateMatrix(dir);
    expect(built.map((r) => r.name)).toEqual(rows.map((r) => r.name));
  }, 120_000);

  afterAll(() => tmp?.cleanup());

  it('covers at least 36 images of every format', () => {
    expect(rows.length).toBeGreaterThanOrEqual(36);
    expect(new Set(rows.map((r) => r.imgconvFormat))).toEqual(new Set(['raw', 'qcow2', 'qed', 'vmdk', 'vhd']));
  });

  for (const row of rows) {
    it(row.name, { timeout: 120_000 }, async () => {
      const file = join(dir, row.path);
      const info = qemuInfoJson(file, row.qemuFormat);
      const problems = await compareFixture(row, file, {
        virtualSize: info['virtual-size'] as number,
        map: parseMapJson(qemuMapText(file, row.qemuFormat)),
        info,
        digest: qemuGuestDigest(file, row.qemuFormat, digestKindFor(info['virtual-size'] as number)),
      });
      // One line per disagreement, so a failure shows all of them at once.
      if (problems.length) expect.fail(`${row.name} (${row.notes}):\n${problems.join('\n')}`);
    });
  }

  describe('probing safety', () => {
    for (const row of rows.filter(isProbeTrap)) {
      it(`${row.name}: probing gives raw or an error naming -f raw; -f raw opens it`, async () => {
        const file = join(dir, row.path);
        // QEMU either refuses to probe it or reads it as raw: the file is not a valid image.
        const q = qemuImgStatus(['info', '--output=json', file]);
        if (q.status === 0) expect((JSON.parse(q.stdout) as { format: string }).format).toBe('raw');
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

  describe('CLI smoke (bin/imgconv, built by the test command)', () => {
    // One fixture of each format, the first of its kind that is not a probe trap.
    const perFormat = new Map<string, MatrixRow>();
    for (const r of rows) if (!isProbeTrap(r) && !perFormat.has(r.imgconvFormat)) perFormat.set(r.imgconvFormat, r);
    for (const [format, row] of perFormat) {
      it(`${format}: imgconv info/map --output json (${row.name})`, () => {
        expect(existsSync(join(REPO, 'dist/src/cli.js')), 'dist/ is missing: build with `npx tsc -p .`').toBe(true);
        const file = join(dir, row.path);
        const cli = (args: string[]) => {
          const r = spawnSync(process.execPath, [join(REPO, 'bin/imgconv'), ...args, file], { encoding: 'utf8' });
          expect(r.status, `imgconv ${args.join(' ')}: ${r.stderr}`).toBe(0);
          return r.stdout;
        };
        const info = JSON.parse(cli(['info', '--output', 'json'])) as Record<string, unknown>;
        const qinfo = qemuInfoJson(file, row.qemuFormat);
        expect(info.format).toBe(format);
        expect(info['virtual-size']).toBe(qinfo['virtual-size']);
        const map = parseMapJson(cli(['map', '--output', 'json']));
        expect(diffMaps(parseMapJson(qemuMapText(file, row.qemuFormat)), map)).toBeNull();
      });
    }
  });
});
