/**
 * The batch's interactive view in a real terminal (tmux): the compiled CLI loads the view lazily,
 * shows the overall bar and a line per image under way, and ends with the result table — once,
 * since stdout is the same terminal.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuRequired, withTmpDir } from '../support/qemu.js';
import { judgeConverted, makeMixedImages } from './fixtures.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-batch-terminal-');
const socket = tmp.path('tmux.sock');

function tmuxAvailable(): boolean {
  const ok = spawnSync('tmux', ['-V']).status === 0;
  if (!ok && qemuRequired) throw new Error('tmux is required here (CI or IMGCONV_REQUIRE_QEMU=1) but was not found; scripts/test.sh installs it');
  return ok;
}
function tmux(...args: string[]): string {
  return execFileSync('tmux', ['-S', socket, '-f', '/dev/null', ...args], { encoding: 'utf8' });
}
const run = qemuAvailable() && tmuxAvailable();

beforeAll(() => {
  if (!run) return;
  if (!existsSync(join(root, 'dist', 'src', 'progress', 'batch-interactive.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (!existsSync(join(root, 'dist', 'src', 'progress', 'batch-interactive.js'))) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});
afterAll(() => {
  if (run) spawnSync('tmux', ['-S', socket, 'kill-server']);
  tmp.cleanup();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function printable(raw: string): string {
  // eslint-disable-next-line no-control-regex
  return raw.replace(/\x1b\[[0-9;?<>=]*[ -/]*[@-~]/g, '').replace(/\x1b[\]P_^][^\x07\x1b]*(\x07|\x1b\\)/g, '').replace(/\x1b./g, '');
}

describe.runIf(run)('the batch view in a real terminal (tmux)', () => {
  it('overall bar, a line per image under way, then the table once', async () => {
    const dir = join(tmp.dir, 'images');
    mkdirSync(dir);
    const fixtures = makeMixedImages(dir, { slow: [24, 16] }).filter((f) => ['slow0.qcow2', 'slow1.qcow2', 'disk.vmdk', 'snapshot.qcow2'].includes(f.name));
    for (const f of fixtures) execFileSync('cp', [join(dir, f.name), join(dir, `${f.name}.orig`)]);
    const log = tmp.path('term.log');
    tmux('new-session', '-d', '-s', 'batch', '-x', '100', '-y', '40', 'env', '-u', 'CI', '-u', 'CONTINUOUS_INTEGRATION', 'LANG=C.UTF-8', 'PS1=$ ', 'bash', '--norc', '--noprofile');
    tmux('pipe-pane', '-t', 'batch', '-o', `cat >> '${log}'`);
    tmux('send-keys', '-t', 'batch', '-l', `cd ${dir} && ${process.execPath} ${bin} inplace --to qed --jobs 2 ${fixtures.map((f) => f.name).join(' ')}; echo "EXIT=$?"`);
    tmux('send-keys', '-t', 'batch', 'Enter');
    const screens: string[] = [];
    const t0 = Date.now();
    let end = '';
    for (;;) {
      const s = tmux('capture-pane', '-p', '-t', 'batch').replace(/\s+$/, '');
      if (s !== screens[screens.length - 1]) screens.push(s);
      if (/^EXIT=\d+$/m.test(s)) {
        end = s;
        break;
      }
      if (Date.now() - t0 > 90_000) throw new Error(`timed out; the screen:\n${s}`);
      await sleep(20);
    }
    // One image is refused (internal snapshot): exit 1.
    expect(end).toMatch(/^EXIT=1$/m);
    expect(end).toContain('imgconv inplace 4 images → qed  2 at a time');
    expect(end).toMatch(/█+ 4\/4 images {2}[\d.]+ MiB of [\d.]+ MiB/);
    expect(end).toMatch(/slow0\.qcow2\s+qcow2 → qed\s+[\d.]+ s\s+[\d.]+ KiB\s+[\d.]+ MiB\s+✔ converted/);
    expect(end).toMatch(/disk\.vmdk\s+vmdk → qed\s+[\d.]+ s\s+[\d.]+ KiB\s+[\d.]+ [KM]?i?B\s+✔ converted/);
    expect(end).toMatch(/snapshot\.qcow2\s+qcow2 → qed\s+[\d.]+ s\s+—\s+—\s+✘ refused/);
    expect(end).toContain('✘ 4 images → qed: 3 converted, 1 refused in');
    expect(end).toMatch(/needs action:\n\s+snapshot\.qcow2: refused: qcow2: unsupported internal snapshots/);
    // The table is the view's last frame; the plain report is not printed a second time.
    expect(end.match(/4 images → qed: 3 converted/g)).toHaveLength(1);
    expect(end).not.toContain('metadata written');
    // While it ran: images under way on their own lines, with their phase.
    const rec = printable(readFileSync(log, 'utf8'));
    expect(rec).toMatch(/▸ slow0\.qcow2\s+qcow2 → (analyse|plan|move|write|commit|verify|reclaim)/);
    expect(rec).toMatch(/▸ slow1\.qcow2\s+qcow2 → (analyse|plan|move|write|commit|verify|reclaim)/);
    expect(rec).toMatch(/[█░]+ [0-3]\/4 images/);
    for (const f of fixtures.filter((x) => x.expect === 'converted')) judgeConverted(dir, f, 'qed');
  }, 120_000);
});
