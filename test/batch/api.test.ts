/**
 * The library API as a Node tool uses it: the README's examples run verbatim against the built
 * package imported by its name ('imgconv', from a folder where it is installed as a dependency),
 * and cancellation through the AbortSignal midway through a conversion — before the commit point
 * the image stays a valid source image, after it the conversion completes — judged by qemu-img.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { ConversionFailedError, convertInPlace, type Phase } from '../../src/engine/convert.js';
import * as api from '../../src/index.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { judgeConverted, makeMixedImages, sha256 } from './fixtures.js';

const root = join(import.meta.dirname, '..', '..');
const tmp = withTmpDir('imgconv-batch-api-');
afterAll(() => tmp.cleanup());

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'batch', 'run.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (!existsSync(join(root, 'dist', 'src', 'batch', 'run.js'))) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

/** The ```js blocks of the README's "Library API" section. */
function readmeExamples(): string[] {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  const start = readme.indexOf('\n## Library API\n');
  expect(start).toBeGreaterThan(0);
  const end = readme.indexOf('\n## ', start + 5);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]!);
}

/** A folder where imgconv is installed as a dependency (node_modules/imgconv → this package). */
function project(name: string): string {
  const dir = join(tmp.dir, name);
  mkdirSync(join(dir, 'node_modules'), { recursive: true });
  symlinkSync(root, join(dir, 'node_modules', 'imgconv'));
  return dir;
}

describe('the exported API', () => {
  it('the names the issue promises, and the batch ones, are exported as functions and classes', () => {
    for (const name of ['planConversion', 'convertInPlace', 'recover', 'openImage', 'convertMany', 'planMany', 'readManifest', 'Manifest', 'ConversionFailedError'] as const) {
      expect(typeof api[name], name).toBe('function');
    }
    expect(api.allDrivers.length).toBeGreaterThan(0);
  });
});

describe.runIf(qemuAvailable())('the README examples, run against the built package', () => {
  it('one image: open, plan, convert with progress and a signal', () => {
    const [single] = readmeExamples();
    const dir = project('single');
    const fixtures = makeMixedImages(dir).filter((f) => f.name === 'plain.qcow2');
    copyFileSync(join(dir, 'plain.qcow2'), join(dir, 'disk.qcow2'));
    copyFileSync(join(dir, 'plain.qcow2'), join(dir, 'disk.qcow2.orig'));
    writeFileSync(join(dir, 'example.mjs'), single!);
    const r = spawnSync(process.execPath, ['example.mjs'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^disk\.qcow2: qcow2, 8388608 bytes\n/);
    expect(r.stdout).toMatch(/^plan: \d+ bytes of metadata, \d+ bytes of data to move$/m);
    expect(r.stdout).toMatch(/^write \d+\/\d+$/m);
    expect(r.stdout).toMatch(/^converted qcow2 → qed: probes as qed, virtual size unchanged, guest mapping identical, structure check clean$/m);
    judgeConverted(dir, { ...fixtures[0]!, name: 'disk.qcow2' }, 'qed');
  });

  it('many images with a manifest', () => {
    const [, many] = readmeExamples();
    const dir = project('many');
    makeMixedImages(dir);
    copyFileSync(join(dir, 'dynamic.vhd'), join(dir, 'db.vhd'));
    copyFileSync(join(dir, 'disk.vmdk'), join(dir, 'web.vmdk'));
    copyFileSync(join(dir, 'disk.raw'), join(dir, 'build.raw'));
    const fixtures = [
      { name: 'web.vmdk', qemuFormat: 'vmdk', expect: 'converted' as const },
      { name: 'db.vhd', qemuFormat: 'vpc', expect: 'converted' as const },
      { name: 'build.raw', qemuFormat: 'raw', expect: 'converted' as const },
    ];
    for (const f of fixtures) copyFileSync(join(dir, f.name), join(dir, `${f.name}.orig`));
    writeFileSync(join(dir, 'example.mjs'), many!);
    const r = spawnSync(process.execPath, ['example.mjs'], { cwd: dir, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe('web.vmdk: converted\ndb.vhd: converted\nbuild.raw: converted\nall converted\n');
    for (const f of fixtures) judgeConverted(dir, f, 'qcow2');
    expect(readFileSync(join(dir, 'batch.jsonl'), 'utf8').trimEnd().split('\n').length).toBe(3 * 3);
  });
});

describe.runIf(qemuAvailable())('cancellation through the AbortSignal (library)', () => {
  /** A 512 B-cluster qcow2: every data cluster moves to QED, so the move phase lasts. */
  function slowImage(name: string): string {
    const dir = join(tmp.dir, name);
    mkdirSync(dir);
    makeMixedImages(dir, { slow: [16] });
    return join(dir, 'slow0.qcow2');
  }

  it('midway through the data move (before the commit point): ConversionFailedError, the image untouched and valid', async () => {
    const img = slowImage('cancel-before');
    copyFileSync(img, `${img}.orig`);
    const ac = new AbortController();
    const seen: Phase[] = [];
    let movedWhenAborted = 0;
    const e = await convertInPlace(img, {
      to: 'qed',
      drivers: allDrivers,
      signal: ac.signal,
      onProgress: (p) => {
        if (!seen.includes(p.phase)) seen.push(p.phase);
        if (p.phase === 'move' && p.bytesDone > 0 && !ac.signal.aborted) {
          movedWhenAborted = p.bytesDone;
          ac.abort();
        }
      },
    }).then(
      () => undefined,
      (x: unknown) => x,
    );
    expect(e).toBeInstanceOf(ConversionFailedError);
    expect((e as ConversionFailedError).imageState).toBe('untouched');
    expect(movedWhenAborted).toBeGreaterThan(0);
    expect(seen).toEqual(['analyse', 'plan', 'move']);
    expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
    expect(JSON.parse(qemuImg(['info', '--output=json', img])).format).toBe('qcow2');
    expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qcow2', `${img}.orig`, img]).status).toBe(0);
    expect(qemuImgStatus(['check', '-f', 'qcow2', img]).status).toBe(0);
    expect(sha256(img)).toBe(sha256(`${img}.orig`));
  });

  it('after the commit point (during verify): the conversion completes; the image is converted and valid', async () => {
    const img = slowImage('cancel-after');
    copyFileSync(img, `${img}.orig`);
    const ac = new AbortController();
    const report = await convertInPlace(img, {
      to: 'qed',
      drivers: allDrivers,
      signal: ac.signal,
      onProgress: (p) => {
        if (p.phase === 'verify') ac.abort();
      },
    });
    expect(ac.signal.aborted).toBe(true);
    expect(report.target.format).toBe('qed');
    judgeConverted(join(img, '..'), { name: 'slow0.qcow2', qemuFormat: 'qcow2', expect: 'converted' }, 'qed');
  });
});
