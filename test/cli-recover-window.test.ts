/**
 * `imgconv recover --move-window SIZE` (bin/imgconv, so it needs the build): parsed as `inplace` parses
 * it, and a value the engine does not take is refused before recovery touches image or journal.
 * (What the window does in recovery: test/engine/recover-window.test.ts.)
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, writeFileSync } from 'node:fs';
import { withTmpDir } from './support/qemu.js';
import { ensureBuilt, fileSha256, runCli } from './support/cli.js';
import { journalPath } from '../src/engine/journal.js';

const tmp = withTmpDir('imgconv-cli-recwin-');

const run = runCli;
const sha = fileSha256;

beforeAll(ensureBuilt);
afterAll(() => tmp.cleanup());

describe('imgconv recover --move-window', () => {
  it('--help names the option and its default (the conversion\'s window)', () => {
    const r = run('recover', '--help');
    expect(r.code).toBe(0);
    expect(r.out).toContain('--move-window <size>');
    expect(r.out.replace(/\s+/g, ' ')).toContain("default the interrupted conversion's");
  });

  it('a window below 4K or not a size is refused, image and journal untouched', () => {
    const img = tmp.path('x.raw');
    writeFileSync(img, Buffer.alloc(1 << 20, 7));
    const jpath = journalPath(img);
    const before = sha(img);
    for (const v of ['1K', 'lots']) {
      const r = run('recover', '--move-window', v, img);
      expect(r.code, r.err).toBe(1);
      expect(r.err).toContain(`--move-window ${v}`);
      expect(sha(img)).toBe(before);
      expect(existsSync(jpath)).toBe(false);
    }
    // A valid window with nothing to recover: as without it.
    const ok = run('recover', '--move-window', '1M', img);
    expect(ok.code, ok.err).toBe(0);
    expect(ok.out).toContain('no interrupted conversion');
  });
});
