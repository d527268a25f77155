/**
 * The real CLI in a real terminal: tmux runs a shell, the test types the command (send-keys) and
 * reads the screen (capture-pane) as a person would see it — the live view while data moves, the
 * phases ticked, the verdict — and presses Ctrl-C in a second run. Everything the terminal received
 * is also recorded (pipe-pane), so frames too short to catch on screen can still be checked.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { PHASES } from '../../src/engine/convert.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuRequired, withTmpDir } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-terminal-');

/** tmux is installed by scripts/test.sh; where the suite must not skip (CI), a missing tmux fails. */
function tmuxAvailable(): boolean {
  const ok = spawnSync('tmux', ['-V']).status === 0;
  if (!ok && qemuRequired) throw new Error('tmux is required here (CI or IMGCONV_REQUIRE_QEMU=1) but was not found; scripts/test.sh installs it');
  return ok;
}

/**
 * A tmux server of our own (its socket in the test's folder, no user config), so nothing else's
 * sessions or environment leak in, and nothing is left behind.
 */
const socket = tmp.path('tmux.sock');
function tmux(...args: string[]): string {
  return execFileSync('tmux', ['-S', socket, '-f', '/dev/null', ...args], { encoding: 'utf8' });
}

const run = qemuAvailable() && tmuxAvailable();

beforeAll(() => {
  if (!run) return;
  if (!existsSync(join(root, 'dist', 'src', 'cli.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});
afterAll(() => {
  if (run) spawnSync('tmux', ['-S', socket, 'kill-server']);
  tmp.cleanup();
});

/**
 * 64 MiB qcow2 with 512-byte clusters, every cluster written: converted to QED (≥ 4 KiB clusters)
 * every data cluster moves, so there is a progress bar to watch.
 */
let orig = '';
function copy(name: string): string {
  if (!orig) {
    const raw = tmp.path('orig.raw');
    const fd = openSync(raw, 'w');
    for (let mib = 0; mib < 64; mib++) writeSync(fd, Buffer.alloc(1 << 20, (mib * 37 + 1) & 0xff), 0, 1 << 20, mib << 20);
    ftruncateSync(fd, 64 << 20);
    closeSync(fd);
    orig = tmp.path('orig.qcow2');
    qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, orig]);
  }
  const p = tmp.path(name);
  copyFileSync(orig, p);
  return p;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The visible screen, trailing blank lines dropped. */
function screen(session: string): string {
  return tmux('capture-pane', '-p', '-t', session).replace(/\s+$/, '');
}

/** Drops escape sequences: what the terminal was told to print, frame after frame. */
function printable(raw: string): string {
  // eslint-disable-next-line no-control-regex
  return raw.replace(/\x1b\[[0-9;?<>=]*[ -/]*[@-~]/g, '').replace(/\x1b[\]P_^][^\x07\x1b]*(\x07|\x1b\\)/g, '').replace(/\x1b./g, '');
}

/**
 * Starts a shell in a new 120×50 session, records its output, types the command, and returns a
 * watcher that collects every distinct screen until the shell prints EXIT=<code>.
 */
function startInTerminal(session: string, image: string) {
  const log = tmp.path(`${session}.log`);
  tmux('new-session', '-d', '-s', session, '-x', '120', '-y', '50', 'env', '-u', 'CI', '-u', 'CONTINUOUS_INTEGRATION', 'LANG=C.UTF-8', 'PS1=$ ', 'bash', '--norc', '--noprofile');
  tmux('pipe-pane', '-t', session, '-o', `cat >> '${log}'`);
  tmux('send-keys', '-t', session, '-l', `${process.execPath} ${bin} inplace --to qed ${image}; echo "EXIT=$?"`);
  tmux('send-keys', '-t', session, 'Enter');
  const screens: string[] = [];
  return {
    screens,
    recorded: () => printable(readFileSync(log, 'utf8')),
    /** Polls the screen every 20 ms; stops when `until` holds for a screen or the command ended. */
    async watch(until: (s: string) => boolean = () => false, timeoutMs = 90_000): Promise<string> {
      const t0 = Date.now();
      for (;;) {
        const s = screen(session);
        if (s !== screens[screens.length - 1]) screens.push(s);
        if (until(s) || /^EXIT=\d+$/m.test(s)) return s;
        if (Date.now() - t0 > timeoutMs) throw new Error(`timed out; the screen:\n${s}`);
        await sleep(20);
      }
    },
  };
}

/** The line of the view showing a phase: its mark and name. */
function row(s: string, phase: string): string {
  const line = s.split('\n').find((l) => new RegExp(`^\\s*\\S ${phase}\\b`).test(l));
  if (!line) throw new Error(`no row for ${phase} on the screen:\n${s}`);
  return line.trim();
}

describe.runIf(run)('the interactive view in a real terminal (tmux)', () => {
  it('shows the conversion live — phases, moving bar, counts, pictures — and ends with the verdict', async () => {
    const img = copy('live.qcow2');
    const t = startInTerminal('live', img);
    const end = await t.watch();
    expect(end, end).toMatch(/^EXIT=0$/m);

    // What a person sees at the end.
    expect(end).toContain(`imgconv inplace ${img}  qcow2 → qed`);
    for (const p of PHASES) expect(row(end, p)).toMatch(new RegExp(`^✔ ${p}`));
    expect(end).toMatch(/^\s*✔ Converted qcow2 → qed in \d+\.\d s$/m);
    for (const v of ['probes as qed', 'virtual size unchanged', 'guest mapping identical', 'structure check clean']) expect(end).toMatch(new RegExp(`✔ ${v}$`, 'm'));
    expect(end).toMatch(/metadata written \d+\.\d KiB {3}data moved [\d.]+ MiB/);
    expect(end).toMatch(/host file \(a cell is [\d.]+ [KM]iB\)\n\s+before H[▒█·]+\n\s+after {2}H[▓█·]+\n\s+H header/);
    expect(end).not.toContain('metadata written:'); // the stdout report is not repeated on the same terminal
    expect(end).not.toContain('░'); // no bar left over

    // While it ran: the screen showed phases under way.
    const live = t.screens.filter((s) => /^\s*▸ \w+/m.test(s));
    expect(live.length, 'screens seen while converting').toBeGreaterThan(0);
    // Everything the terminal received: the bar moved during the move phase.
    const rec = t.recorded();
    const percents = new Set([...rec.matchAll(/[█░]{30} +(\d+)% [\d.]+ [KMG]?i?B \/ [\d.]+ MiB/g)].map((m) => Number(m[1])));
    expect(percents.size, `move percentages drawn: ${[...percents].join(', ')}`).toBeGreaterThanOrEqual(2);
    expect(Math.max(...percents)).toBe(100);

    expect((JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string }).format).toBe('qed');
    expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qed', orig, img]).status).toBe(0);
  });

  it('Ctrl-C: says it is stopping safely, then exactly what state the image is in', async () => {
    const img = copy('interrupt.qcow2');
    const t = startInTerminal('interrupt', img);
    const at = await t.watch((s) => /^\s*▸ (move|write|commit|verify|reclaim)\b/m.test(s));
    expect(at, 'the command ended before it could be interrupted').not.toMatch(/^EXIT=/m);
    const interruptedIn = /^\s*▸ (\w+)/m.exec(at)![1]!;
    tmux('send-keys', '-t', 'interrupt', 'C-c');
    const end = await t.watch();
    const rec = t.recorded();
    if (PHASES.indexOf(interruptedIn as (typeof PHASES)[number]) < PHASES.indexOf('commit')) {
      // Before the commit point: rolled back, the image is as it was.
      expect(rec).toContain('■ Stopping safely: undoing what was written; the image keeps its original format…');
      expect(end).toMatch(/^EXIT=1$/m);
      expect(end).toContain('■ Stopped safely: nothing was converted');
      expect(end).toContain('cancelled before the commit point');
      expect(end).toContain(`image state: untouched: ${img} is exactly as it was (qcow2)`);
      expect(end).not.toContain('imgconv recover');
      // The phase it stopped in is marked (the engine may have moved on a step since the screen was read).
      const failed = PHASES.filter((p) => row(end, p).startsWith('✘'));
      expect(failed).toHaveLength(1);
      expect(PHASES.indexOf(failed[0]!)).toBeGreaterThanOrEqual(PHASES.indexOf(interruptedIn as (typeof PHASES)[number]));
      expect(PHASES.indexOf(failed[0]!)).toBeLessThanOrEqual(PHASES.indexOf('commit'));
      expect((JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string }).format).toBe('qcow2');
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qcow2', orig, img]).status).toBe(0);
    } else {
      // The key landed past the commit point (a very fast machine): the conversion is finished.
      expect(rec).toContain('■ Stop requested after the commit point: finishing the conversion so the image ends consistent…');
      expect(end).toMatch(/^EXIT=0$/m);
      expect(end).toContain('The stop came after the commit point, so the conversion was finished: the image is consistent.');
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qed', orig, img]).status).toBe(0);
    }
    expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
  });
});
