/**
 * The real CLI killed with SIGKILL at many points of a conversion that takes a while, then
 * `imgconv recover`: the image must always end valid, in the source or the target format, with the
 * guest content qemu-img sees unchanged (qemu-img compare) and a clean qemu-img check.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-sigkill-');
afterAll(() => tmp.cleanup());

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'cli.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

function runToCompletion(args: string[]) {
  return spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
}

/** Starts a conversion and kills it after `ms` milliseconds (or lets it finish first). */
function killAfter(args: string[], ms: number): Promise<number | null> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], { stdio: 'ignore' });
    const t = setTimeout(() => p.kill('SIGKILL'), ms);
    p.on('exit', (code) => {
      clearTimeout(t);
      resolve(code);
    });
  });
}

interface KillCase {
  name: string;
  from: string;
  to: string;
  make: (path: string) => void;
}

const killCases: KillCase[] = [
  {
    // 512-byte qcow2 clusters: QED needs ≥ 4 KiB, so every data cluster moves (tens of MiB of I/O).
    name: 'qcow2 (512 B clusters, all data moves) → qed',
    from: 'qcow2',
    to: 'qed',
    make: (p) => {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', p, '256M']);
      qemuIo(p, 'qcow2', ['write -P 0x11 0 24M', 'write -P 0x22 100M 8M', 'write -z 200M 1M', 'write -P 0x33 255M 1M']);
    },
  },
  {
    // Nothing moves: a short conversion of metadata only, over many L2 tables.
    name: 'qed (4 KiB clusters, sparse 4 GiB) → qcow2',
    from: 'qed',
    to: 'qcow2',
    make: (p) => {
      qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4k', p, '4G']);
      qemuIo(p, 'qed', ['write -P 0x11 0 8M', 'write -P 0x22 1G 4M', 'write -z 2G 1M', 'write -P 0x33 3G 8M', 'write -P 0x44 4095M 1M']);
    },
  },  {
    // Relocation: 4 KiB clusters written in order lie shifted behind the tables; moving them to host =
    // guest takes many rounds (copy → flush → repoint → flush), evictions to scratch included.
    name: 'qed (4 KiB clusters, 24 MiB shifted behind its tables) → raw, relocated in place',
    from: 'qed',
    to: 'raw',
    make: (p) => {
      qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4k', p, '64M']);
      qemuIo(p, 'qed', ['write -P 0x51 0 16M', 'write -P 0x52 40M 8M', 'write -z 50M 1M', 'write -P 0x53 63M 1M']);
    },
  },
  {
    // Two steps sharing one journal: qcow2 → VMDK (data stays), then VMDK → raw (relocation).
    name: 'qcow2 → raw, in two steps through an intermediate format',
    from: 'qcow2',
    to: 'raw',
    make: (p) => {
      qemuImg(['create', '-q', '-f', 'qcow2', p, '64M']);
      qemuIo(p, 'qcow2', ['write -P 0x61 0 24M', 'write -P 0x62 30M 8M', 'write -P 0x63 63M 1M']);
    },
  },
];

describe.runIf(qemuAvailable())('SIGKILL during a real conversion, then recover', () => {
  it.each(killCases)('$name: always ends in a valid image with identical guest content', async ({ name, from, to, make }) => {
    const orig = tmp.path(`orig-${from}-${to}`);
    make(orig);
    // Delays are fractions of an uncut run on this machine, so they straddle the commit point
    // whatever the machine's speed.
    const timed = tmp.path(`timed-${from}-${to}.img`);
    copyFileSync(orig, timed);
    const t0 = Date.now();
    expect(runToCompletion(['inplace', '--to', to, timed]).status).toBe(0);
    const full = Date.now() - t0;
    const vsize = (JSON.parse(qemuImg(['info', '--output=json', '-f', from, orig])) as { 'virtual-size': number })['virtual-size'];
    const outcomes = { source: 0, target: 0 };
    const delays = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.92, 0.97, 1.02].map((f) => Math.round(f * full));
    const killAndCheck = async (ms: number) => {
      const img = tmp.path(`kill-${from}-${to}-${kills}-${ms}.img`);
      copyFileSync(orig, img);
      await killAfter(['inplace', '--to', to, img], ms);
      const r = runToCompletion(['recover', img]);
      expect(r.status, `recover after ${ms} ms: ${r.stderr}`).toBe(0);
      expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
      const info = JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string; 'virtual-size': number };
      expect([from, to]).toContain(info.format);
      expect(info['virtual-size']).toBe(vsize);
      outcomes[info.format === from ? 'source' : 'target']++;
      kills++;
      const cmp = qemuImgStatus(['compare', '-f', from, '-F', info.format, orig, img]);
      expect(cmp.status, `compare after kill at ${ms} ms (${info.format}): ${cmp.stdout}${cmp.stderr}`).toBe(0);
      if (info.format !== 'raw') {
        // qemu-img has no check for raw (every byte is valid).
        const chk = qemuImgStatus(['check', '--output=json', '-f', info.format, img]);
        const j = JSON.parse(chk.stdout) as { corruptions?: number; 'check-errors'?: number };
        expect(j.corruptions ?? 0, `check after kill at ${ms} ms`).toBe(0);
        expect(j['check-errors'] ?? 0).toBe(0);
      }
    };
    let kills = 0;
    for (const ms of delays) await killAndCheck(ms);
    // Load on a shared machine can shift every kill to one side of the commit point; then kill
    // earlier or later until both sides are covered, so the test always shows both recoveries.
    for (let extra = 1; extra <= 6 && (outcomes.source === 0 || outcomes.target === 0); extra++) {
      await killAndCheck(outcomes.source === 0 ? Math.round(full * 0.03 / extra) : Math.round(full * (1 + 0.5 * extra)));
    }
    console.log(`${name}: uncut conversion ${full} ms; SIGKILL outcomes over ${kills} kills: ${outcomes.source} rolled back to ${from}, ${outcomes.target} converted to ${to}`);
    // The delays must straddle the commit point, or the test shows nothing.
    expect(outcomes.source).toBeGreaterThan(0);
    expect(outcomes.target).toBeGreaterThan(0);
  }, 240_000);
});
