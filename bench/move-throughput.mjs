#!/usr/bin/env node
/**
 * A/B timing of the moving conversions (relocation rounds and copies), outside the full benchmark:
 * one random raw disk, QED and qcow2 made of it by `qemu-img convert`, then for every repetition,
 * every case and every build (interleaved, so drift on a shared machine hits all builds alike) a fresh
 * fsynced `cp` of the source converted by `node <build>/bin/imgconv inplace --progress json`. Reports
 * wall time and the time of each phase (from the JSON progress lines' elapsedMs), medians over the
 * repetitions, and judges every result with `qemu-img compare` against the raw disk.
 *
 *   node bench/move-throughput.mjs --build before=/tmp/old-checkout --build after=. \
 *     [--size 1024] (MiB) [--reps 3] [--dir /tmp/move-throughput] [--case qed-raw,qcow2-raw,raw-vhd]
 *     [--prof DIR] (a CPU profile per run, node --cpu-prof) [--keep]
 *     [--move-window SIZE] (passed to imgconv: e.g. 4G keeps raw → VHD's direct route, copies before the commit)
 *
 * A build is a checkout whose dist/ is compiled (npm run build).
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, copyFileSync, fsyncSync, mkdirSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';

const CASES = {
  'qed-raw': { src: 'qed', to: 'raw', qemuTo: 'raw' },
  'qcow2-raw': { src: 'qcow2', to: 'raw', qemuTo: 'raw' },
  'raw-vhd': { src: 'raw', to: 'vhd', qemuTo: 'vpc' },
  'qcow2-vhd': { src: 'qcow2', to: 'vhd', qemuTo: 'vpc' },
  // 512-byte clusters: the QED result's clusters are compacted below its end after the commit.
  'qcow2_512-qed': { src: 'qcow2_512', to: 'qed', qemuTo: 'qed' },
};
/** Sources made by qemu-img convert: format and -o options. */
const SOURCES = { qed: ['qed'], qcow2: ['qcow2'], qcow2_512: ['qcow2', 'cluster_size=512'] };

function parseArgs(argv) {
  const o = { builds: [], size: 1024, reps: 3, dir: '/tmp/move-throughput', cases: ['qed-raw', 'qcow2-raw', 'raw-vhd'], prof: undefined, keep: false, moveWindow: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === '--build') {
      const [name, path] = v().split('=');
      o.builds.push({ name, path: resolve(path) });
    } else if (a === '--size') o.size = Number(v());
    else if (a === '--reps') o.reps = Number(v());
    else if (a === '--dir') o.dir = resolve(v());
    else if (a === '--case') o.cases = v().split(',');
    else if (a === '--prof') o.prof = resolve(v());
    else if (a === '--keep') o.keep = true;
    else if (a === '--move-window') o.moveWindow = v();
    else throw new Error(`unknown argument ${a}`);
  }
  if (o.builds.length === 0) o.builds.push({ name: 'this', path: resolve('.') });
  for (const c of o.cases) if (!CASES[c]) throw new Error(`unknown case ${c} (${Object.keys(CASES).join(', ')})`);
  return o;
}

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}\n${r.stderr}`);
  return r;
}

function syncFile(path) {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function writeRandomRaw(path, bytes) {
  const buf = Buffer.allocUnsafe(16 << 20);
  const fd = openSync(path, 'w');
  try {
    for (let pos = 0; pos < bytes; pos += buf.length) {
      randomFillSync(buf);
      writeSync(fd, buf, 0, Math.min(buf.length, bytes - pos), pos);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const median = (xs) => {
  const s = xs.slice().sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/** Runs one conversion; returns wall seconds and seconds per phase. */
function convert(build, image, to, profDir, tag, moveWindow) {
  const args = [];
  if (profDir) args.push('--cpu-prof', `--cpu-prof-dir=${profDir}`, `--cpu-prof-name=${tag}.cpuprofile`);
  args.push(join(build.path, 'bin/imgconv'), 'inplace', '--to', to, '--progress', 'json', ...(moveWindow ? ['--move-window', moveWindow] : []), image);
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`imgconv (${build.name}) ${to} ${image}: exit ${r.status}\n${r.stderr}\n${r.stdout}`);
  const phases = {};
  let last;
  let end = 0;
  for (const line of r.stderr.split('\n')) {
    if (!line.startsWith('{')) continue;
    const e = JSON.parse(line);
    if (e.event === 'phase') {
      if (last) phases[last.phase] = (phases[last.phase] ?? 0) + (e.elapsedMs - last.elapsedMs) / 1000;
      last = e;
    }
    end = e.elapsedMs;
  }
  if (last) phases[last.phase] = (phases[last.phase] ?? 0) + (end - last.elapsedMs) / 1000;
  return { wall, phases };
}

function main() {
  const o = parseArgs(process.argv.slice(2));
  mkdirSync(o.dir, { recursive: true });
  if (o.prof) mkdirSync(o.prof, { recursive: true });
  const bytes = o.size << 20;
  const raw = join(o.dir, 'src.raw');
  console.error(`random raw ${o.size} MiB`);
  writeRandomRaw(raw, bytes);
  const sources = { raw };
  for (const fmt of new Set(o.cases.map((c) => CASES[c].src))) {
    if (fmt === 'raw') continue;
    sources[fmt] = join(o.dir, `src.${fmt}`);
    const [qemuFmt, qemuOpts] = SOURCES[fmt];
    sh('qemu-img', ['convert', '-f', 'raw', '-O', qemuFmt, ...(qemuOpts ? ['-o', qemuOpts] : []), raw, sources[fmt]]);
    syncFile(sources[fmt]);
  }
  const results = {}; // case → build → [{wall, phases}]
  for (let rep = 0; rep < o.reps; rep++) {
    for (const c of o.cases) {
      for (const b of o.builds) {
        const spec = CASES[c];
        const image = join(o.dir, `work-${c}.img`);
        rmSync(image, { force: true });
        copyFileSync(sources[spec.src], image);
        syncFile(image);
        const r = convert(b, image, spec.to, o.prof, `${c}-${b.name}-${rep}`, o.moveWindow);
        const cmp = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', spec.qemuTo, raw, image], { encoding: 'utf8' });
        r.identical = cmp.status === 0;
        r.compare = cmp.stdout.trim();
        r.allocatedMiB = (statSync(image).blocks * 512) / 2 ** 20;
        console.error(
          `${c} ${b.name} #${rep}: ${r.wall.toFixed(3)} s, ${Object.entries(r.phases).map(([p, s]) => `${p} ${s.toFixed(3)}`).join(', ')}; compare: ${r.compare}`,
        );
        ((results[c] ??= {})[b.name] ??= []).push(r);
        if (!o.keep) rmSync(image, { force: true });
      }
    }
  }
  const phaseNames = ['analyse', 'plan', 'move', 'write', 'commit', 'verify', 'reclaim'];
  console.log(`\n${o.size} MiB random data, ${o.reps} repetitions, medians (min–max) in seconds; MiB/s = guest MiB ÷ median wall\n`);
  console.log(`| conversion | build | wall s | MiB/s | ${phaseNames.join(' | ')} | qemu-img compare |`);
  console.log(`| --- | --- | --- | --- | ${phaseNames.map(() => '---').join(' | ')} | --- |`);
  for (const c of o.cases) {
    for (const b of o.builds) {
      const rs = results[c][b.name];
      const walls = rs.map((r) => r.wall);
      const cell = (xs) => `${median(xs).toFixed(3)} (${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)})`;
      const ph = phaseNames.map((p) => median(rs.map((r) => r.phases[p] ?? 0)).toFixed(3));
      const same = rs.every((r) => r.identical) ? 'identical ×' + rs.length : rs.map((r) => r.compare).join('; ');
      console.log(`| ${c.replace('-', ' → ')} | ${b.name} | ${cell(walls)} | ${(o.size / median(walls)).toFixed(1)} | ${ph.join(' | ')} | ${same} |`);
    }
  }
  if (!o.keep) rmSync(o.dir, { recursive: true, force: true });
}

main();
