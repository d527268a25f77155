/**
 * The real CLI without a terminal (stderr a pipe, as in CI and logs): plain lines without escape
 * bytes, the JSON event stream, --quiet, errors and Ctrl-C in each, and no ink or react loaded.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, ftruncateSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { PHASES } from '../../src/engine/convert.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { checkJsonEvents } from './json-events.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-progress-cli-');
afterAll(() => tmp.cleanup());

/** Runs the CLI with stdout and stderr piped; CI unset so `auto` is decided by the pipe alone. */
function run(args: string[], extraEnv: NodeJS.ProcessEnv = {}, node: string[] = []) {
  const env = { ...process.env, ...extraEnv };
  delete env.CI;
  const r = spawnSync(process.execPath, [...node, bin, ...args], { encoding: 'utf8', env });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'cli.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

/** 64 MiB qcow2 with 512-byte clusters: QED needs ≥ 4 KiB clusters, so every data cluster moves. */
let orig = '';
function copy(name: string): string {
  if (!orig) {
    // qemu-img convert from a raw file is much faster than qemu-io writes into 512-byte clusters.
    const raw = tmp.path('orig.raw');
    const fd = openSync(raw, 'w');
    for (const [at, mib, byte] of [[0, 20, 0x11], [40, 4, 0x22], [63, 1, 0x33]] as const) writeSync(fd, Buffer.alloc(mib << 20, byte), 0, mib << 20, at << 20);
    ftruncateSync(fd, 64 << 20);
    closeSync(fd);
    orig = tmp.path('orig.qcow2');
    qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, orig]);
  }
  const p = tmp.path(name);
  copyFileSync(orig, p);
  return p;
}

function formatOf(p: string): string {
  return (JSON.parse(qemuImg(['info', '--output=json', p])) as { format: string }).format;
}

describe.runIf(qemuAvailable())('progress of the real CLI on a pipe', () => {
  it('auto on a pipe is plain: a line per phase and per 10% moved, no escape bytes; the report on stdout as before', () => {
    const img = copy('plain.qcow2');
    const r = run(['inplace', '--to', 'qed', img]);
    expect(r.code, r.err).toBe(0);
    expect(r.err).not.toContain('\x1b');
    expect(r.out).not.toContain('\x1b');
    const lines = r.err.split('\n').filter(Boolean);
    expect(lines.every((l) => l.startsWith('imgconv: ')), r.err).toBe(true);
    expect(lines.filter((l) => /^imgconv: \[\d\/7\] /.test(l)).map((l) => l.split(' ')[2])).toEqual([...PHASES]);
    const moved = lines.filter((l) => l.startsWith('imgconv: move ')).map((l) => Number(l.match(/move (\d+)%/)![1]));
    expect(moved).toEqual([10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
    expect(lines.at(-1)).toMatch(/^imgconv: done in \d+\.\d s$/);
    expect(r.out).toContain(`${img}: converted qcow2 → qed in place`);
    expect(r.out).toMatch(/^verified: probes as qed, virtual size unchanged, guest mapping identical, structure check clean$/m);
    expect(formatOf(img)).toBe('qed');
  });

  it('--progress json: every line an event of the schema, phases in order, counts that match the plan, a final done', () => {
    const img = copy('json.qcow2');
    const plan = JSON.parse(run(['plan', '--to', 'qed', '--output', 'json', img]).out) as { dataMoveBytes: number; metadataBytes: number };
    expect(plan.dataMoveBytes).toBeGreaterThan(20 << 20);
    const r = run(['inplace', '--to', 'qed', '--progress', 'json', img]);
    expect(r.code, r.err).toBe(0);
    const events = checkJsonEvents(r.err);
    expect(events.filter((e) => e.event === 'phase').map((e) => e.phase)).toEqual([...PHASES]);
    const move = events.filter((e) => e.phase === 'move');
    expect(move.every((e) => e.bytesTotal === plan.dataMoveBytes)).toBe(true);
    expect(move.length).toBeGreaterThan(10);
    expect(move.length).toBeLessThanOrEqual(1 + 100 + 5); // one per percent (and a rare heartbeat)
    expect(move.at(-1)!.bytesDone).toBe(plan.dataMoveBytes);
    const done = events.at(-1)!;
    expect(done).toMatchObject({ event: 'done', image: img, source: 'qcow2', target: 'qed', dataBytes: plan.dataMoveBytes, metadataBytes: plan.metadataBytes });
    expect(done.verified).toEqual(['probes as qed', 'virtual size unchanged', 'guest mapping identical', 'structure check clean']);
    expect(r.out).toContain('converted qcow2 → qed in place'); // the report is still on stdout
    expect(formatOf(img)).toBe('qed');
  });

  it('--quiet prints nothing at all on success; --progress none keeps the report', () => {
    const a = copy('quiet.qcow2');
    const q = run(['inplace', '--to', 'qed', '--quiet', a]);
    expect(q).toEqual({ code: 0, out: '', err: '' });
    expect(formatOf(a)).toBe('qed');
    const b = copy('none.qcow2');
    const n = run(['inplace', '--to', 'qed', '--progress', 'none', b]);
    expect(n.code).toBe(0);
    expect(n.err).toBe('');
    expect(n.out).toContain('converted qcow2 → qed in place');
    const j = run(['inplace', '--to', 'qcow2', '--quiet', '--output', 'json', b]);
    expect(j.code, j.err).toBe(0);
    expect(j.err).toBe('');
    expect(JSON.parse(j.out)).toMatchObject({ target: { format: 'qcow2' } }); // asked for, so printed
  });

  it('errors: one JSON error event (and nothing else) in json mode; the usual line in plain and quiet mode', () => {
    const img = copy('refused.qcow2');
    const j = run(['inplace', '--to', 'qcow2', '--progress', 'json', img]);
    expect(j.code).toBe(1);
    const events = checkJsonEvents(j.err);
    expect(events.at(-1)).toMatchObject({ event: 'error', imageState: 'untouched', recover: null });
    expect(events.at(-1)!.message).toMatch(/already qcow2; nothing to do/);
    for (const args of [['--quiet'], ['--progress', 'none'], ['--progress', 'plain']]) {
      const p = run(['inplace', '--to', 'qcow2', ...args, img]);
      expect(p.code).toBe(1);
      expect(p.out).toBe('');
      // plain mode has announced the analysis; the refusal is the line main() prints for every command
      expect(p.err).toMatch(args[1] === 'plain' ? /^imgconv: \[1\/7\] analyse\nimgconv: .*already qcow2; nothing to do\n$/ : /^imgconv: .*already qcow2; nothing to do\n$/);
    }
    const bad = run(['inplace', '--to', 'qed', '--progress', 'fancy', img]);
    expect(bad.code).not.toBe(0);
    expect(bad.err).toMatch(/Allowed choices are auto, plain, json, none/);
  });

  it('Ctrl-C (SIGINT) during the move: a stopping event, then an error that states the image untouched', async () => {
    const img = copy('sigint.qcow2');
    const env = { ...process.env };
    delete env.CI;
    const child = spawn(process.execPath, [bin, 'inplace', '--to', 'qed', '--progress', 'json', img], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    let signalled = false;
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
      if (!signalled && err.includes('"phase":"move"')) {
        signalled = true;
        child.kill('SIGINT');
      }
    });
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(signalled).toBe(true);
    const events = checkJsonEvents(err);
    const stopping = events.findIndex((e) => e.event === 'stopping');
    expect(stopping).toBeGreaterThan(0);
    const last = events.at(-1)!;
    if (last.event === 'error') {
      // Cancelled before the commit point: nothing changed.
      expect(code).toBe(1);
      expect(last).toMatchObject({ imageState: 'untouched', recover: null });
      expect(last.message).toMatch(/cancelled before the commit point/);
      expect(formatOf(img)).toBe('qcow2');
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qcow2', orig, img]).status).toBe(0);
    } else {
      // The signal landed after the commit point (a very fast machine): the conversion completes.
      expect(code).toBe(0);
      expect(last.event).toBe('done');
      expect(formatOf(img)).toBe('qed');
    }
    expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
  });

  it('ink and react are never loaded without a terminal (nor by --version or info)', () => {
    const log = tmp.path('loaded.log');
    const hooks = tmp.path('hooks.mjs');
    const register = tmp.path('register.mjs');
    writeFileSync(
      hooks,
      `import { appendFileSync } from 'node:fs';
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  if (/\\/node_modules\\/(ink|react|react-reconciler)\\//.test(r.url)) appendFileSync(${JSON.stringify(log)}, r.url + '\\n');
  return r;
}
`,
    );
    writeFileSync(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hooks).href)});\n`);
    const loader = ['--import', pathToFileURL(register).href];
    const loaded = () => (existsSync(log) ? readFileSync(log, 'utf8') : '');
    // The hook sees ink when something does import it.
    const control = spawnSync(process.execPath, [...loader, '--input-type=module', '-e', "await import('ink')"], { cwd: root, encoding: 'utf8' });
    expect(control.status, control.stderr).toBe(0);
    expect(loaded()).toMatch(/node_modules\/ink\//);
    writeFileSync(log, '');
    const img = copy('loads.qcow2');
    expect(run(['--version'], {}, loader).code).toBe(0);
    expect(run(['info', img], {}, loader).code).toBe(0);
    // qcow2 → qed → qcow2, each with another output
    for (const [mode, to] of [['auto', 'qed'], ['json', 'qcow2']]) {
      const r = run(['inplace', '--to', to!, '--progress', mode!, img], {}, loader);
      expect(r.code, r.err).toBe(0);
    }
    expect(loaded()).toBe('');
  });
});
