/**
 * The real CLI as a user runs it: exit codes, messages on stderr, JSON on stdout.
 * Runs bin/imgconv, so it needs the build (the test command builds first).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { withTmpDir } from './support/qemu.js';
import { ensureBuilt, runCli } from './support/cli.js';

const tmp = withTmpDir('imgconv-cli-');

const run = runCli;

beforeAll(ensureBuilt);
afterAll(() => tmp.cleanup());

describe('imgconv CLI', () => {
  it('prints its version', () => {
    const r = run('--version');
    expect(r.code).toBe(0);
    expect(r.out.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it('info/map/check on a raw file with a hole', () => {
    const p = tmp.path('disk.raw');
    const bytes = new Uint8Array(3 * 65536);
    bytes.fill(0xab, 65536, 2 * 65536);
    writeFileSync(p, bytes);
    const info = run('info', '--output', 'json', '-f', 'raw', p);
    expect(info.code).toBe(0);
    const j = JSON.parse(info.out);
    expect(j.format).toBe('raw');
    expect(j['virtual-size']).toBe(3 * 65536);
    expect(j.probed).toBe(false);
    const map = run('map', '--output', 'json', '-f', 'raw', p);
    expect(map.code).toBe(0);
    const entries = JSON.parse(map.out) as { start: number; length: number; data: boolean }[];
    expect(entries.reduce((s, e) => s + e.length, 0)).toBe(3 * 65536);
    expect(entries.some((e) => e.data && e.start <= 65536 && e.start + e.length >= 2 * 65536)).toBe(true);
    const check = run('check', '-f', 'raw', p);
    expect(check.code).toBe(0);
    expect(check.out).toMatch(/No errors/);
  });

  it('a missing file is a clear error with exit code 1', () => {
    const r = run('info', tmp.path('nope.qcow2'));
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^imgconv: open .*nope\.qcow2.*ENOENT/);
    expect(r.err).not.toMatch(/at .*\.js:\d+/); // no stack trace for expected errors
  });

  it('an unknown -f names the known formats', () => {
    const p = tmp.path('x.raw');
    writeFileSync(p, new Uint8Array(512));
    const r = run('info', '-f', 'floppy', p);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/unknown format "floppy" \(known: .*raw/);
  });

  it('a bad --output value is refused by the parser', () => {
    const r = run('info', '--output', 'xml', tmp.path('x.raw'));
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/Allowed choices are human, json/);
  });
});
