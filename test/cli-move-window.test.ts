/**
 * `--move-window SIZE` on `plan` and `inplace`, as a user runs it (bin/imgconv, so it needs the build):
 * a small window plans a smaller peak, the conversion with it is judged by qemu-img, and a value the
 * engine does not take is refused before anything is written.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { randomRaw } from './support/peak-storage.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from './support/qemu.js';
import { ensureBuilt, fileSha256, runCli } from './support/cli.js';

const tmp = withTmpDir('imgconv-cli-window-');
const MiB = 1 << 20;

const run = runCli;
const sha = fileSha256;

beforeAll(ensureBuilt);
afterAll(() => tmp.cleanup());

describe.skipIf(!qemuAvailable())('imgconv --move-window', () => {
  let raw = '';
  let qed = '';
  beforeAll(() => {
    raw = tmp.path('src.raw');
    randomRaw(raw, 16 * MiB);
    qed = tmp.path('src.qed');
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, qed]);
  });

  it('plan --output json: a 256K window plans more rounds and a smaller peak than the default', () => {
    const wide = run('plan', '--to', 'raw', '--output', 'json', qed);
    const narrow = run('plan', '--to', 'raw', '--output', 'json', '--move-window', '256K', qed);
    expect(wide.code, wide.err).toBe(0);
    expect(narrow.code, narrow.err).toBe(0);
    const w = JSON.parse(wide.out);
    const n = JSON.parse(narrow.out);
    expect(n.relocation.rounds).toBeGreaterThan(4 * w.relocation.rounds);
    expect(w.peakExtraBytes).toBeGreaterThan(8 * MiB);
    expect(n.peakExtraBytes).toBeLessThan(w.peakExtraBytes / 4);
    // Bytes and other spellings of the same size plan the same.
    const bytes = JSON.parse(run('plan', '--to', 'raw', '--output', 'json', '--move-window', String(256 << 10), qed).out);
    const kib = JSON.parse(run('plan', '--to', 'raw', '--output', 'json', '--move-window', '256KiB', qed).out);
    expect(bytes.peakExtraBytes).toBe(n.peakExtraBytes);
    expect(kib.relocation.rounds).toBe(n.relocation.rounds);
  });

  it('inplace --move-window 512K converts (qemu-img compare identical)', () => {
    const img = tmp.path('work.qed');
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, img]);
    const r = run('inplace', '--to', 'raw', '--progress', 'none', '--output', 'json', '--move-window', '512K', img);
    expect(r.code, r.err).toBe(0);
    expect(JSON.parse(r.out).target.format).toBe('raw');
    expect(qemuImgStatus(['compare', '-f', 'raw', '-F', 'raw', raw, img]).status).toBe(0);
  });

  for (const bad of ['1000', '3K', '64X', '-1M', 'lots', '1.5M']) {
    it(`inplace --move-window ${bad} is refused before any write`, () => {
      const img = tmp.path(`bad-${bad}.qed`);
      qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, img]);
      const before = sha(img);
      const r = run('inplace', '--to', 'raw', '--progress', 'none', '--move-window', bad, img);
      expect(r.code).toBe(1);
      expect(r.err).toContain(`--move-window ${bad}`);
      expect(sha(img)).toBe(before);
      expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
    });
  }

  it('is listed in plan --help and inplace --help', () => {
    for (const cmd of ['plan', 'inplace']) {
      const r = run(cmd, '--help');
      expect(r.code).toBe(0);
      expect(r.out).toMatch(/--move-window <size>/);
    }
  });
});
