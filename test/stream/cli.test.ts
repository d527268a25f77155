/**
 * The streaming commands as a user runs them, through real pipes (bash, `| cat >`, `tar`), judged by
 * qemu-img: stream → file, measure = bytes, --tar read by GNU tar (and an OVA assembled with it),
 * stream | unstream round trips for every format (as a copy, as raw, and into another format in
 * place), QEMU's own sequential layouts read, refusals before the destination exists, a truncated
 * stream leaving no destination, the JSON progress events, a terminal on stdout refused, and a
 * reader that goes away.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeTarHeader } from '../../src/stream/tar.js';
import { generateMatrix } from '../integration/matrix.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const bin = join(root, 'bin', 'imgconv');
const haveQemu = qemuAvailable();
const QEMU_FORMAT: Record<string, string> = { qcow2: 'qcow2', vhd: 'vpc', vmdk: 'vmdk', raw: 'raw' };

/** Runs a bash pipeline with pipefail; $IC is imgconv, $F the fixture folder, $T the scratch folder. */
function sh(script: string, env: Record<string, string>) {
  const r = spawnSync('bash', ['-c', `set -o pipefail\n${script}`], {
    encoding: 'utf8',
    env: { ...process.env, IC: `${process.execPath} ${bin}`, ...env },
    maxBuffer: 64 << 20,
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

function qemu(args: string[], cwd?: string) {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8', ...(cwd ? { cwd } : {}) });
  return { code: r.status, out: r.stdout + r.stderr };
}

describe.skipIf(!haveQemu)('imgconv stream / measure / unstream (CLI, pipes)', () => {
  let tmp: ReturnType<typeof withTmpDir>;
  let env: Record<string, string>;
  let F = '';
  let T = '';

  beforeAll(() => {
    if (!existsSync(join(root, 'dist', 'src', 'cli-stream.js'))) {
      const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
      if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
    }
    tmp = withTmpDir('imgconv-stream-cli-');
    F = join(tmp.dir, 'fixtures');
    T = tmp.dir;
    generateMatrix(F);
    env = { F, T };
  }, 120_000);
  afterAll(() => tmp?.cleanup());

  it('a qcow2 streamed through a pipe (from a qcow2 with a backing file) is what QEMU reads, and measure said its size', () => {
    const r = sh('$IC stream --to qcow2 --progress none "$F/qcow2-child.qcow2" | cat > "$T/child.qcow2"', env);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toBe('');
    expect(qemu(['compare', '-f', 'qcow2', '-F', 'qcow2', join(F, 'qcow2-child.qcow2'), join(T, 'child.qcow2')]).code).toBe(0);
    const check = qemu(['check', join(T, 'child.qcow2')]);
    expect(check.out).toContain('No errors were found');
    const human = sh('$IC measure --to qcow2 "$F/qcow2-child.qcow2"', env);
    expect(human.out).toMatch(/^required size: (\d+)\nfully allocated size: (\d+)\n$/);
    const json = JSON.parse(sh('$IC measure --to qcow2 --output json "$F/qcow2-child.qcow2"', env).out) as { required: number; 'fully-allocated': number };
    expect(json.required).toBe(statSync(join(T, 'child.qcow2')).size);
    expect(human.out).toContain(`required size: ${json.required}\n`);
    expect(json['fully-allocated']).toBeGreaterThan(json.required);
    // -o repeated, IMAGE after it.
    const o = sh('$IC stream --to qcow2 -o cluster_size=4k -o refcount_bits=8 --progress none "$F/qcow2-child.qcow2" | cat > "$T/child4k.qcow2"', env);
    expect(o.code, o.err).toBe(0);
    expect(qemu(['info', join(T, 'child4k.qcow2')]).out).toMatch(/cluster_size: 4096[\s\S]*refcount bits: 8/);
    expect(qemu(['compare', '-f', 'qcow2', '-F', 'qcow2', join(F, 'qcow2-child.qcow2'), join(T, 'child4k.qcow2')]).code).toBe(0);
  });

  it('--tar: GNU tar lists the member with the measured size, its content is a clean VMDK, and an OVA can be assembled in one pipe', () => {
    const r = sh('$IC stream --to vmdk --tar disk1.vmdk --progress none "$F/vhd-dynamic.vhd" | cat > "$T/disk.tar"', env);
    expect(r.code, r.err).toBe(0);
    const tarFile = join(T, 'disk.tar');
    const m = JSON.parse(sh('$IC measure --to vmdk --tar disk1.vmdk --output json "$F/vhd-dynamic.vhd"', env).out) as { required: number; tar: { 'image-required': number } };
    expect(m.required).toBe(statSync(tarFile).size);
    const member = decodeTarHeader(readFileSync(tarFile).subarray(0, 4096));
    expect(member.name).toBe('disk1.vmdk');
    expect(member.size).toBe(m.tar['image-required']);
    const list = sh('tar -tvf "$T/disk.tar"', env);
    expect(list.code, list.err).toBe(0);
    expect(list.out).toMatch(new RegExp(`\\b${member.size}\\b.*disk1\\.vmdk`));
    const x = sh('mkdir -p "$T/x" && tar -xf "$T/disk.tar" -C "$T/x"', env);
    expect(x.code, x.err).toBe(0);
    expect(qemu(['compare', '-f', 'vpc', '-F', 'vmdk', join(F, 'vhd-dynamic.vhd'), join(T, 'x', 'disk1.vmdk')]).code).toBe(0);
    expect(qemu(['check', join(T, 'x', 'disk1.vmdk')]).out).toContain('No errors were found');
    // README recipe: the descriptor from tar (its two end blocks cut off), then the disk member.
    writeFileSync(join(T, 'vm.ovf'), '<?xml version="1.0"?><Envelope/>\n');
    const ova = sh('cd "$T" && { tar -b1 --format=ustar -cf - vm.ovf | head -c -1024; $IC stream --to vmdk --tar disk1.vmdk --progress none "$F/vhd-dynamic.vhd"; } > vm.ova && tar -tf vm.ova', env);
    expect(ova.code, ova.err).toBe(0);
    expect(ova.out).toBe('vm.ovf\ndisk1.vmdk\n');
  });

  for (const to of ['qcow2', 'vhd', 'vmdk', 'raw']) {
    it(`stream --to ${to} | unstream: back as a ${to} copy and as a raw disk, both identical to the source`, () => {
      const src = join(F, 'qcow2-child.qcow2');
      const copy = sh(`$IC stream --to ${to} --progress none "$F/qcow2-child.qcow2" | $IC unstream --from ${to} --to ${to} --progress none "$T/rt.${to}"`, env);
      expect(copy.code, copy.err).toBe(0);
      expect(qemu(['compare', '-f', 'qcow2', '-F', QEMU_FORMAT[to]!, src, join(T, `rt.${to}`)]).code).toBe(0);
      const raw = sh(`$IC stream --to ${to} --progress none "$F/qcow2-child.qcow2" | $IC unstream --from ${to} --to raw --output json --progress none "$T/rt-${to}.raw"`, env);
      expect(raw.code, raw.err).toBe(0);
      expect(qemu(['compare', '-f', 'qcow2', '-F', 'raw', src, join(T, `rt-${to}.raw`)]).code).toBe(0);
      const report = JSON.parse(raw.out) as { virtualSize: number; fileLength: number };
      expect(report.fileLength).toBe(1 << 20);
      // Sparse where the stream had no data: the 1 MiB disk holds 320 KiB of data.
      expect(statSync(join(T, `rt-${to}.raw`)).blocks * 512).toBeLessThan(512 << 10);
    });
  }

  it('unstream --to another format: the raw disk converted in place (VHD stream → qcow2)', () => {
    const r = sh('$IC stream --to vhd --progress none "$F/qcow2-child.qcow2" | $IC unstream --from vhd --to qcow2 --output json --progress none "$T/via.qcow2"', env);
    expect(r.code, r.err).toBe(0);
    expect((JSON.parse(r.out) as { conversion?: unknown }).conversion).toBeDefined();
    expect(qemu(['compare', '-f', 'qcow2', '-F', 'qcow2', join(F, 'qcow2-child.qcow2'), join(T, 'via.qcow2')]).code).toBe(0);
    expect(qemu(['check', join(T, 'via.qcow2')]).out).toContain('No errors were found');
    expect(existsSync(join(T, 'via.qcow2.imgconv-journal'))).toBe(false);
  });

  it("reads QEMU's own sequential files: a dynamic and a fixed VHD, a streamOptimized VMDK, a compressed qcow2", () => {
    for (const [file, from, qf] of [
      ['vhd-dynamic.vhd', 'vhd', 'vpc'],
      ['vhd-fixed.vhd', 'vhd', 'vpc'],
      ['vmdk-stream.vmdk', 'vmdk', 'vmdk'],
      ['qcow2-compressed.qcow2', 'qcow2', 'qcow2'],
    ] as const) {
      const out = join(T, `q-${file}.raw`);
      const r = sh(`$IC unstream --from ${from} --to raw --progress none "${out}" < "$F/${file}"`, env);
      expect(r.code, `${file}: ${r.err}`).toBe(0);
      expect(qemu(['compare', '-f', qf, '-F', 'raw', join(F, file), out]).code, file).toBe(0);
    }
  });

  it('refuses, before the destination exists, a qcow2 whose data precedes its tables and a monolithicSparse VMDK', () => {
    const q = sh('$IC unstream --from qcow2 --to raw --progress none "$T/no1.raw" < "$F/qcow2-c4k.qcow2"', env);
    expect(q.code).toBe(1);
    expect(q.err).toMatch(/^imgconv: qcow2: stream order = \d+.*lies before the end of the tables/);
    expect(existsSync(join(T, 'no1.raw'))).toBe(false);
    const v = sh('$IC unstream --from vmdk --to raw --progress none "$T/no2.raw" < "$F/vmdk-sparse.vmdk"', env);
    expect(v.code).toBe(1);
    expect(v.err).toMatch(/without markers/);
    expect(existsSync(join(T, 'no2.raw'))).toBe(false);
  });

  it('never overwrites: an existing destination is refused and left as it was', () => {
    writeFileSync(join(T, 'exists.raw'), 'keep me');
    const r = sh('$IC stream --to qcow2 --progress none "$F/qcow2-base.qcow2" | $IC unstream --from qcow2 --to raw --progress none "$T/exists.raw"', env);
    expect(r.code).not.toBe(0);
    expect(r.err).toContain('exists; unstream writes only new files');
    expect(readFileSync(join(T, 'exists.raw'), 'utf8')).toBe('keep me');
  });

  it('a truncated stream fails and leaves no destination behind', () => {
    for (const to of ['qcow2', 'vhd', 'vmdk']) {
      const r = sh(`$IC stream --to ${to} --progress none "$F/qcow2-child.qcow2" > "$T/full.${to}" && head -c $(( $(stat -c %s "$T/full.${to}") - 1536 )) "$T/full.${to}" | $IC unstream --from ${to} --to raw --progress none "$T/cut-${to}.raw"`, env);
      expect(r.code, to).toBe(1);
      expect(r.err, to).toMatch(/stream ended|does not end with|end-of-stream/);
      expect(existsSync(join(T, `cut-${to}.raw`)), to).toBe(false);
    }
  });

  it('--progress json: the inplace event shape, phases in order, one done event with the byte count', () => {
    const r = sh('$IC stream --to qcow2 --progress json "$F/raw-sparse.raw" 2> "$T/events" > "$T/ev.qcow2"', env);
    expect(r.code, r.err).toBe(0);
    const events = readFileSync(join(T, 'events'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    for (const e of events) {
      for (const k of ['event', 'phase', 'bytesDone', 'bytesTotal', 'rate', 'etaSeconds', 'elapsedMs']) expect(e, JSON.stringify(e)).toHaveProperty(k);
      expect(e.bytesDone as number).toBeLessThanOrEqual(e.bytesTotal as number);
    }
    expect(events.filter((e) => e.event === 'phase').map((e) => e.phase)).toEqual(['map', 'write']);
    const last = events[events.length - 1]!;
    expect(last.event).toBe('done');
    expect(last.bytes).toBe(statSync(join(T, 'ev.qcow2')).size);
    expect(events.filter((e) => e.event === 'done')).toHaveLength(1);
    const u = sh('$IC unstream --from qcow2 --to raw --progress json "$T/ev.raw" < "$T/ev.qcow2" 2> "$T/uevents"', env);
    expect(u.code, u.err).toBe(0);
    const uev = readFileSync(join(T, 'uevents'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(uev.filter((e) => e.event === 'phase').map((e) => e.phase)).toEqual(['head', 'write']);
    expect(uev[uev.length - 1]!.event).toBe('done');
    const bad = sh('$IC unstream --from qcow2 --to raw --progress json "$T/ev2.raw" < "$F/qcow2-c4k.qcow2" 2> "$T/bevents"', env);
    expect(bad.code).toBe(1);
    const bev = readFileSync(join(T, 'bevents'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(bev[bev.length - 1]).toMatchObject({ event: 'error' });
    expect(String(bev[bev.length - 1]!.message)).toMatch(/stream order/);
  });

  it('refuses a terminal on stdout, and says so when the reader goes away', () => {
    const tty = sh('script -qec "$IC stream --to raw \\"$F/raw-odd.raw\\"" /dev/null', env);
    expect(tty.out).toContain('stdout is a terminal');
    expect(tty.code).toBe(1);
    const gone = sh('$IC stream --to raw --progress none "$F/raw-sparse.raw" | head -c 1000 > /dev/null', env);
    expect(gone.code).toBe(1);
    expect(gone.err).toMatch(/^imgconv: write stdout at offset \d+: the reading side closed the pipe\n$/);
  });
});
