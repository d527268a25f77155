/**
 * The real CLI under signals and a genuinely full file system:
 * - SIGINT and SIGTERM during `inplace`: before the commit point the CLI stops and rolls back, after it
 *   the conversion finishes; either way the exit message says in which state the image is, and the
 *   image is valid (qemu-img check clean, qemu-img compare identical to the original).
 * - ENOSPC on a small tmpfs: the conversion fails saying the image's state; after `recover` (when the
 *   message asks for it) the image is valid and identical to the original.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const tmp = withTmpDir('imgconv-signals-');
afterAll(() => tmp.cleanup());

beforeAll(() => {
  if (!existsSync(join(root, 'dist', 'src', 'cli.js'))) {
    const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
    if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
  }
});

interface Outcome {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Whether the signal was sent while the process still ran. */
  signalled: boolean;
}

/**
 * When to send the signal: after `ms` milliseconds, or as soon as the journal shows a point of the
 * protocol — 'prepared' (the journal exists: before the commit point) or 'committed' (the journal has
 * grown past its first record: the COMMIT record is durable). Polled every millisecond or two.
 */
type Trigger = { ms: number } | { journal: 'prepared' | 'committed' };

/** Runs the CLI on `image` and sends `signal` when `trigger` fires (unless it has exited by then). */
function runWithSignal(args: string[], image: string, signal: NodeJS.Signals, trigger: Trigger): Promise<Outcome> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let signalled = false;
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const fire = () => {
      signalled = p.exitCode === null && p.kill(signal);
    };
    let timer: NodeJS.Timeout | undefined;
    if ('ms' in trigger) timer = setTimeout(fire, trigger.ms);
    else {
      const journal = `${image}.imgconv-journal`;
      let first = -1;
      timer = setInterval(() => {
        let size: number;
        try {
          size = statSync(journal).size;
        } catch {
          return;
        }
        if (size === 0) return;
        if (trigger.journal === 'prepared' || (first >= 0 && size > first)) {
          clearInterval(timer);
          fire();
        } else if (first < 0) first = size;
      }, 1);
    }
    p.on('close', (code) => {
      clearTimeout(timer);
      clearInterval(timer);
      resolve({ code, stdout, stderr, signalled });
    });
  });
}

function cli(args: string[]) {
  return spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
}

/** qemu-img's verdict on the image: its format, a clean check, identical guest content. */
function judge(orig: string, origFormat: string, img: string): string {
  const info = JSON.parse(qemuImg(['info', '--output=json', img])) as { format: string };
  const chk = qemuImgStatus(['check', '--output=json', '-f', info.format, img]);
  const j = JSON.parse(chk.stdout || '{}') as { corruptions?: number; 'check-errors'?: number };
  expect(j.corruptions ?? 0, `qemu-img check ${img}: ${chk.stdout}${chk.stderr}`).toBe(0);
  expect(j['check-errors'] ?? 0).toBe(0);
  const cmp = qemuImgStatus(['compare', '-f', origFormat, '-F', info.format, orig, img]);
  expect(cmp.status, `qemu-img compare ${img}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  const ours = cli(['check', img]);
  expect(ours.status, `imgconv check ${img}: ${ours.stdout}${ours.stderr}`).toBe(0);
  return info.format;
}

describe.runIf(qemuAvailable())('SIGINT and SIGTERM to the real CLI during inplace', () => {
  it('stops before the commit point or finishes after it, says which, and leaves a valid image', async () => {
    // 512-byte qcow2 clusters: QED needs ≥ 4 KiB, so every data cluster moves — a conversion long
    // enough to be interrupted at many points.
    const orig = tmp.path('orig.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', orig, '32M']);
    qemuIo(orig, 'qcow2', ['write -P 0x11 0 5M', 'write -P 0x22 20M 1M', 'write -z 25M 1M', 'write -P 0x33 31M 1M']);
    const timed = tmp.path('timed.qcow2');
    copyFileSync(orig, timed);
    const t0 = Date.now();
    expect(cli(['inplace', '--to', 'qed', timed]).status).toBe(0);
    const full = Date.now() - t0;

    const outcomes = { stopped: 0, finishedAfterSignal: 0, finishedBefore: 0, killedAtStartUp: 0 };
    let n = 0;
    const interrupt = async (signal: NodeJS.Signals, trigger: Trigger) => {
      const img = tmp.path(`sig-${n++}.qcow2`);
      copyFileSync(orig, img);
      const o = await runWithSignal(['inplace', '--to', 'qed', img], img, signal, trigger);
      const label = `${signal} ${'ms' in trigger ? `after ${trigger.ms} ms` : `once the journal shows ${trigger.journal}`} (uncut ${full} ms): exit ${o.code}\n${o.stdout}${o.stderr}`;
      expect(existsSync(`${img}.imgconv-journal`), `${label}: journal left`).toBe(false);
      if (o.code === null && /converted qcow2 → qed in place/.test(o.stdout)) {
        // The signal arrived after the conversion had finished and the CLI had removed its handler:
        // the default action ended a process that was only exiting. The image must be the target.
        expect(judge(orig, 'qcow2', img), label).toBe('qed');
        outcomes.finishedBefore++;
        return;
      }
      if (o.code === null) {
        // The signal arrived while node was still starting, before the CLI installed its handler:
        // the default action ended the process before it opened the image, which must be unchanged.
        expect(Buffer.compare(readFileSync(img), readFileSync(orig)), label).toBe(0);
        outcomes.killedAtStartUp++;
        return;
      }
      const format = judge(orig, 'qcow2', img);
      if (o.code === 0) {
        // Finished: the signal came after the commit point (or after the end).
        expect(o.stdout, label).toMatch(/converted qcow2 → qed in place/);
        expect(format, label).toBe('qed');
        if (o.signalled && /stopping safely/.test(o.stderr)) outcomes.finishedAfterSignal++;
        else outcomes.finishedBefore++;
      } else {
        // Stopped before the commit point: the message says the image is as it was.
        expect(o.code, label).toBe(1);
        expect(o.stderr, label).toMatch(/stopping safely/);
        expect(o.stderr, label).toMatch(/cancelled before the commit point/);
        expect(o.stderr, label).toMatch(/imgconv: the image was left untouched/);
        expect(format, label).toBe('qcow2');
        outcomes.stopped++;
      }
    };
    // Timed signals land anywhere (including node's start-up); signals keyed to the journal land
    // just before and just after the commit point, whatever the machine's load.
    for (const [i, f] of [0.2, 0.5, 0.8].entries()) await interrupt(i % 2 ? 'SIGTERM' : 'SIGINT', { ms: Math.round(f * full) });
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      await interrupt(signal, { journal: 'prepared' });
      await interrupt(signal, { journal: 'committed' });
    }
    // A loaded machine can still let the conversion pass a point before the signal lands: retry.
    for (let extra = 1; extra <= 6 && (outcomes.stopped === 0 || outcomes.finishedAfterSignal === 0); extra++) {
      await interrupt(extra % 2 ? 'SIGINT' : 'SIGTERM', { journal: outcomes.stopped === 0 ? 'prepared' : 'committed' });
    }
    console.log(`uncut conversion ${full} ms; ${n} interrupted runs: ${outcomes.stopped} stopped before the commit point, ${outcomes.finishedAfterSignal} finished after the signal, ${outcomes.finishedBefore} finished before it, ${outcomes.killedAtStartUp} ended by the signal while node was starting`);
    expect(outcomes.stopped).toBeGreaterThan(0);
    expect(outcomes.finishedAfterSignal).toBeGreaterThan(0);
  }, 180_000);
});

describe.runIf(qemuAvailable())('ENOSPC on a genuinely full file system', () => {
  const mnt = tmp.path('tmpfs');
  let mounted = false;
  let refusal = '';
  beforeAll(() => {
    mkdirSync(mnt, { recursive: true });
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mnt], { encoding: 'utf8' });
    mounted = r.status === 0;
    refusal = `${r.error?.message ?? ''}${r.stderr ?? ''}`.trim();
    // The one environment-dependent skip: without the right to mount, there is no full file system.
    if (!mounted) console.log(`ENOSPC test skipped: mount -t tmpfs refused (${refusal || `exit ${r.status}`})`);
  });
  afterAll(() => {
    if (mounted) spawnSync('umount', [mnt]);
  });

  it('fails saying the state, and the image is valid after recover', async (ctx) => {
    if (!mounted) ctx.skip();
    // A dense raw image whose first cluster holds data: QED's header must take it, so the data moves
    // past the end of the file — space the full file system does not have.
    const orig = tmp.path('full-orig.raw');
    const bytes = new Uint8Array(8 << 20);
    for (let i = 0; i < bytes.length; i += 4096) bytes.fill((i >> 12) & 0xff || 1, i, i + 4096);
    writeFileSync(orig, bytes);
    const seen: string[] = [];
    // Free space left for the conversion: none, a little (the journal fits), more, enough.
    for (const slack of [0, 24 << 10, 48 << 10, 2 << 20]) {
      const img = join(mnt, 'disk.raw');
      const filler = join(mnt, 'filler');
      rmSync(filler, { force: true });
      copyFileSync(orig, img);
      // Fill the rest of the file system, then give back `slack` bytes.
      spawnSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k'], { encoding: 'utf8' });
      const filled = statSync(filler).size;
      spawnSync('truncate', ['-s', String(Math.max(0, filled - slack)), filler]);
      const r = cli(['inplace', '--to', 'qed', img]);
      const label = `slack ${slack}: exit ${r.status}\n${r.stdout}${r.stderr}`;
      if (r.status === 0) {
        seen.push(`slack ${slack}: converted`);
      } else {
        expect(r.stderr, label).toMatch(/ENOSPC|no space left/i);
        const state = /imgconv: (the image was left untouched|the image was restored to its original format|the image needs: imgconv recover .*)$/m.exec(r.stderr);
        expect(state, `${label}: the exit message must say the image's state`).not.toBeNull();
        seen.push(`slack ${slack}: exit ${r.status}, ${state![1]}`);
        if (/needs: imgconv recover/.test(state![1]!)) {
          expect(r.status, label).toBe(4);
          const rec = cli(['recover', img]);
          expect(rec.status, `recover with the file system still full: ${rec.stdout}${rec.stderr}`).toBe(0);
        } else {
          expect(existsSync(`${img}.imgconv-journal`), `${label}: journal left`).toBe(false);
          expect(cli(['recover', img]).stdout).toMatch(/no interrupted conversion/);
        }
      }
      expect(existsSync(`${img}.imgconv-journal`)).toBe(false);
      const format = judge(orig, 'raw', img);
      if (seen.at(-1)!.includes('left untouched')) expect(Buffer.compare(readFileSync(img), Buffer.from(bytes))).toBe(0);
      expect(['raw', 'qed']).toContain(format);
    }
    console.log(`ENOSPC on a 24 MiB tmpfs: ${seen.join('; ')}`);
    expect(seen.some((s) => !s.endsWith('converted'))).toBe(true);
  }, 120_000);
});
