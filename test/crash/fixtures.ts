/**
 * The source images of the crash harness, built with qemu-img/qemu-io into a temporary folder and
 * loaded into memory under /mem/<fixture>/. Small on purpose (≤ 2 MiB virtual): the harness checks
 * tens of thousands of crash states of each. Per source format there are at least three, covering
 * data under the target's header region, a backing file, and data the target must relocate, where
 * the format admits them (raw has no backing file; qcow2 and QED hold their own header at offset 0).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo, withTmpDir } from '../support/qemu.js';
import type { Files } from '../support/recording.js';
import { decodeFooter, encodeUtf16 } from '../../drivers/vhd/index.js';
import type { ConvertOptions } from '../../src/engine/convert.js';
import { DISK_DIFFERENCING, UUID_B, buildDynamic } from '../drivers/vhd-support.js';

export interface Fixture {
  name: string;
  format: string;
  /** The image's path in memory; `files` also holds its backing files. */
  image: string;
  files: Files;
  /** What the fixture exercises, for the report. */
  traits: string[];
  /** The qemu-img format name of the source (vhd is vpc). */
  qemuFormat: string;
  /** False when QEMU cannot read the source format variant (it reads differencing VHDs as dynamic). */
  qemuReadsSource: boolean;
  /** The targets this fixture is converted to (undefined: every other format). */
  targets?: string[];
  /** Target options per target (`-o`); with them a target may be the source's own format (a subformat change). */
  options?: Record<string, Record<string, string>>;
  /** Conversion options besides the target's (a small relocation window: the moves take several rounds); part of the row's name. */
  convert?: RowOptions;
  /**
   * The least relocation rounds the uncut conversion takes (its relocating step's, when it has two): a
   * row written to cover relocation in rounds fails when its conversion no longer takes them.
   */
  rounds?: number;
  /**
   * The source's external data file (memory path), which the conversion adopts as the raw disk: it is
   * there while the image is still the source and gone once the image is the target.
   */
  dataFile?: string;
  /** The source as the row names it, where the format alone does not say it (a data file beside the image). */
  sourceLabel?: string;
}

/** The conversion options a harness row may set (convertInPlace's, beside the target and its `-o`). */
export type RowOptions = Pick<ConvertOptions, 'relocationWindow'>;

const K = 1024;
const M = 1024 * 1024;

interface Spec {
  name: string;
  format: string;
  traits: string[];
  qemuReadsSource?: false;
  /**
   * Only these targets (undefined: every target). Fixtures added to give a pair with short conversions
   * more distinct crash states say so, so they do not lengthen the run for pairs that have plenty.
   */
  targets?: string[];
  /** Target options per target; a within-format conversion (VHD fixed → dynamic) names its format in `targets` and its options here. */
  options?: Record<string, Record<string, string>>;
  convert?: RowOptions;
  rounds?: number;
  sourceLabel?: string;
  /**
   * Creates the image (and its backing or data files) in `dir`; returns the image's file name, the
   * others', and which of them is the image's external data file.
   */
  make: (dir: string) => { image: string; others: string[]; dataFile?: string };
  /**
   * Target subformats this fixture is also converted to, each its own fixture (`<name>@<label>`) of its
   * own pair row (e.g. "raw → vmdk -o subformat=monolithicFlat"): the same files, one target, its options.
   * `full`: only in the full run (IMGCONV_CRASH_FULL), not the CI sample.
   */
  variants?: Variant[];
}

interface Variant {
  label: string;
  to: string;
  options?: Record<string, string>;
  /** Conversion options of the variant's row (a small relocation window), and the rounds it must take. */
  convert?: RowOptions;
  rounds?: number;
  full?: true;
}

/** A variant that is a target subformat (`-o`). */
type SubformatVariant = Variant & { options: Record<string, string> };
const FLAT: SubformatVariant = { label: 'flat', to: 'vmdk', options: { subformat: 'monolithicFlat' } };
const VHD_FIXED: SubformatVariant = { label: 'fixed', to: 'vhd', options: { subformat: 'fixed' } };
/** raw → qcow2 with the image as its raw external data file: a qcow2 metadata file created beside it. */
const DATA_FILE: SubformatVariant = { label: 'datafile', to: 'qcow2', options: { data_file_raw: 'on' } };
/** Variants for the full run only: relocating and two-step conversions are long. */
const full = (v: Variant): Variant => ({ ...v, full: true });
/**
 * A relocation window of a few clusters: the conversion to `to` relocates in `rounds` or more rounds
 * (copy → flush → repoint → flush → punch each) where the default 64 MiB window takes one; a QED
 * target's compaction after the commit copies in batches of the window.
 */
const windowed = (to: string, window: number, rounds?: number): Variant => ({ label: `window${window / K}k`, to, convert: { relocationWindow: window }, ...(rounds !== undefined ? { rounds } : {}) });

const raw = (dir: string, name: string, size: number, runs: [number, number, number][]): void => {
  const b = new Uint8Array(size);
  for (const [off, len, v] of runs) b.fill(v, off, off + len);
  // Copied through qemu-img so the file is sparse where the runs leave zeros (raw's holes matter).
  const dense = join(dir, name + '.dense');
  writeFileSync(dense, b);
  qemuImg(['convert', '-q', '-S', '4k', '-f', 'raw', '-O', 'raw', dense, join(dir, name)]);
  rmSync(dense);
};

const io = (dir: string, file: string, fmt: string, cmds: string[]) => qemuIo(join(dir, file), fmt, cmds);
/** qemu-img / qemu-io run in `dir`: QEMU 7.2 opens a qcow2's relative data file name from its working directory. */
const inDir = (dir: string, cmd: 'qemu-img' | 'qemu-io', args: string[]) => execFileSync(cmd, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
const create = (dir: string, args: string[]) => qemuImg(['create', '-q', ...args.map((a, i) => (i === args.length - 2 ? join(dir, a) : a))]);

export const SPECS: Spec[] = [
  // ---- qcow2 sources ----
  {
    name: 'qcow2-c512',
    variants: [full(FLAT), full(VHD_FIXED)],
    format: 'qcow2',
    traits: ['relocation (512 B clusters: QED needs ≥ 4 KiB)'],
    make: (d) => {
      create(d, ['-f', 'qcow2', '-o', 'cluster_size=512', 'c512.qcow2', '1M']);
      io(d, 'c512.qcow2', 'qcow2', ['write -P 0x11 0 20k', 'write -P 0x22 300k 3k', 'write -z 600k 8k', 'write -P 0x33 1020k 4k']);
      return { image: 'c512.qcow2', others: [] };
    },
  },
  {
    name: 'qcow2-child',
    // → QED with a 4 KiB window: the compaction after the commit (tables and data moved below the end)
    // copies in batches of at most one cluster instead of all at once.
    variants: [windowed('qed', 4 * K)],
    format: 'qcow2',
    traits: ['backing file (qcow2 base)', 'zero clusters over backing data'],
    make: (d) => {
      create(d, ['-f', 'qcow2', '-o', 'cluster_size=4096', 'base.qcow2', '1M']);
      io(d, 'base.qcow2', 'qcow2', ['write -P 0xb1 0 256k', 'write -P 0xb2 512k 64k']);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'child.qcow2'), '1M']);
      io(d, 'child.qcow2', 'qcow2', ['write -P 0xc1 64k 16k', 'write -z 128k 8k', 'write -P 0xc2 900k 12k']);
      return { image: 'child.qcow2', others: ['base.qcow2'] };
    },
  },
  {
    name: 'qcow2-compressed',
    format: 'qcow2',
    traits: ['relocation (compressed clusters)', 'zero clusters'],
    make: (d) => {
      raw(d, 'comp-src.raw', M, [[0, 24 * K, 0x41], [256 * K, 8 * K, 0x42]]);
      qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', join(d, 'comp-src.raw'), join(d, 'comp.qcow2')]);
      io(d, 'comp.qcow2', 'qcow2', ['write -P 0x43 4k 4k', 'write -z 512k 4k', 'write -P 0x44 700k 4k']);
      return { image: 'comp.qcow2', others: [] };
    },
  },
  {
    name: 'qcow2-datafile',
    format: 'qcow2',
    sourceLabel: 'qcow2 (data_file_raw=on)',
    targets: ['raw', 'qed'],
    traits: ['external data file, data_file_raw=on: → raw adopts it (its rename onto the image is the commit point); → QED adopts it, then converts the raw disk (two steps)'],
    make: (d) => {
      inDir(d, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=d.raw,data_file_raw=on', 'dfraw.qcow2', '1M']);
      inDir(d, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x45 0 64k', '-c', 'write -z 16k 8k', '-c', 'write -P 0x46 512k 12k', 'dfraw.qcow2']);
      return { image: 'dfraw.qcow2', others: ['d.raw'], dataFile: 'd.raw' };
    },
  },
  {
    name: 'qcow2-datafile-stale',
    format: 'qcow2',
    sourceLabel: 'qcow2 (data_file, zero clusters over stale bytes)',
    targets: ['raw'],
    traits: ['external data file without data_file_raw: zero clusters over bytes the data file still holds, zeroed in it before the rename'],
    make: (d) => {
      inDir(d, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=d.raw,cluster_size=4096', 'dfstale.qcow2', '1M']);
      inDir(d, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x47 0 64k', '-c', 'write -P 0x48 700k 16k', '-c', 'write -z 8k 16k', '-c', 'write -z 704k 4k', 'dfstale.qcow2']);
      return { image: 'dfstale.qcow2', others: ['d.raw'], dataFile: 'd.raw' };
    },
  },
  // ---- QED sources ----
  {
    name: 'qed-c4k',
    // → VHD dynamic with a 4-cluster window: the 48 KiB of moved clusters relocate inside the QED in 3 rounds.
    variants: [full(FLAT), full(VHD_FIXED), full(DATA_FILE), windowed('vhd', 16 * K, 3)],
    format: 'qed',
    traits: ['4 KiB clusters, 2-cluster tables', 'zero clusters'],
    make: (d) => {
      create(d, ['-f', 'qed', '-o', 'cluster_size=4096,table_size=2', 'c4k.qed', '1M']);
      io(d, 'c4k.qed', 'qed', ['write -P 0x51 0 40k', 'write -z 200k 8k', 'write -P 0x52 1000k 8k']);
      return { image: 'c4k.qed', others: [] };
    },
  },
  {
    name: 'qed-child',
    format: 'qed',
    traits: ['backing file (raw base)'],
    make: (d) => {
      raw(d, 'qbase.raw', 512 * K, [[0, 128 * K, 0x61], [384 * K, 64 * K, 0x62]]);
      qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'qbase.raw', '-F', 'raw', join(d, 'child.qed'), '1M']);
      io(d, 'child.qed', 'qed', ['write -P 0x63 32k 8k', 'write -P 0x64 700k 16k']);
      return { image: 'child.qed', others: ['qbase.raw'] };
    },
  },
  {
    name: 'qed-c64k',
    format: 'qed',
    traits: ['default 64 KiB clusters, data at the end of the disk'],
    make: (d) => {
      create(d, ['-f', 'qed', 'c64k.qed', '2M']);
      io(d, 'c64k.qed', 'qed', ['write -P 0x71 0 64k', 'write -P 0x72 1M 100k', 'write -P 0x73 1984k 64k']);
      return { image: 'c64k.qed', others: [] };
    },
  },
  {
    name: 'qed-reversed',
    format: 'qed',
    targets: ['raw'],
    rounds: 3,
    traits: ['16 runs of 8 KiB (4 KiB clusters) written in reverse guest order: → raw relocates in 3 rounds, some clusters through scratch'],
    make: (d) => {
      create(d, ['-f', 'qed', '-o', 'cluster_size=4096,table_size=2', 'rev.qed', '1M']);
      io(d, 'rev.qed', 'qed', Array.from({ length: 16 }, (_, i) => 15 - i).map((i) => `write -P ${0x90 + i} ${i * 64}k 8k`));
      return { image: 'rev.qed', others: [] };
    },
  },
  // ---- raw sources ----
  {
    name: 'raw-head',
    // → VHD dynamic with a 256 KiB window: raw cannot relocate, so two steps through VMDK sparse, whose
    // moves relocate in 4 rounds (the direct route would copy all 1 MiB before the commit).
    variants: [FLAT, VHD_FIXED, DATA_FILE, windowed('vhd', 256 * K, 4)],
    format: 'raw',
    traits: ['data under the target header region (offset 0)'],
    make: (d) => {
      raw(d, 'head.raw', M, [[0, 12 * K, 0x81], [200 * K, 4 * K, 0x82], [1020 * K, 4 * K, 0x83]]);
      return { image: 'head.raw', others: [] };
    },
  },
  {
    name: 'raw-odd',
    variants: [FLAT, VHD_FIXED, DATA_FILE],
    format: 'raw',
    traits: ['length 100001 (partial last sector)', 'data under the target header region'],
    make: (d) => {
      raw(d, 'odd.raw', 100001, [[0, 3000, 0x91], [50_000, 5000, 0x92], [99_000, 1001, 0x93]]);
      return { image: 'odd.raw', others: [] };
    },
  },
  {
    name: 'raw-sparse',
    format: 'raw',
    traits: ['holes; header region a hole', 'data at the end'],
    make: (d) => {
      raw(d, 'sparse.raw', 2 * M, [[64 * K, 64 * K, 0xa1], [M, 8 * K, 0xa2], [2 * M - 4 * K, 4 * K, 0xa3]]);
      return { image: 'sparse.raw', others: [] };
    },
  },
  // ---- VMDK sources ----
  {
    name: 'vmdk-sparse',
    variants: [full(FLAT), full(VHD_FIXED)],
    format: 'vmdk',
    traits: ['monolithicSparse'],
    make: (d) => {
      create(d, ['-f', 'vmdk', 'sparse.vmdk', '1M']);
      io(d, 'sparse.vmdk', 'vmdk', ['write -P 0xd1 0 64k', 'write -P 0xd2 512k 8k']);
      return { image: 'sparse.vmdk', others: [] };
    },
  },
  {
    name: 'vmdk-stream',
    format: 'vmdk',
    traits: ['relocation (streamOptimized: compressed grains)'],
    make: (d) => {
      raw(d, 'stream-src.raw', M, [[0, 70 * K, 0xe1], [600 * K, 8 * K, 0xe2]]);
      qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', join(d, 'stream-src.raw'), join(d, 'stream.vmdk')]);
      return { image: 'stream.vmdk', others: [] };
    },
  },
  {
    name: 'vmdk-child',
    format: 'vmdk',
    traits: ['backing file (vmdk parent)'],
    make: (d) => {
      create(d, ['-f', 'vmdk', 'vbase.vmdk', '1M']);
      io(d, 'vbase.vmdk', 'vmdk', ['write -P 0xf1 0 128k', 'write -P 0xf2 768k 64k']);
      qemuImg(['create', '-q', '-f', 'vmdk', '-b', 'vbase.vmdk', '-F', 'vmdk', join(d, 'vchild.vmdk'), '1M']);
      io(d, 'vchild.vmdk', 'vmdk', ['write -P 0xf3 64k 64k', 'write -P 0xf4 900k 4k']);
      return { image: 'vchild.vmdk', others: ['vbase.vmdk'] };
    },
  },
  {
    name: 'vmdk-reversed',
    format: 'vmdk',
    targets: ['raw'],
    rounds: 3,
    traits: ['12 grains written in reverse guest order: → raw relocates in 3 rounds, some grains through scratch'],
    // The window reaches identity targets too: two grains a round, 15 rounds instead of 3.
    variants: [windowed('raw', 128 * K, 15)],
    make: (d) => {
      create(d, ['-f', 'vmdk', 'rev.vmdk', '1M']);
      io(d, 'rev.vmdk', 'vmdk', Array.from({ length: 12 }, (_, i) => 11 - i).map((i) => `write -P ${0xa0 + i} ${i * 64}k 64k`));
      return { image: 'rev.vmdk', others: [] };
    },
  },
  {
    name: 'vmdk-flat',
    format: 'vmdk',
    sourceLabel: 'vmdk (monolithicFlat)',
    targets: ['raw'],
    traits: ['monolithicFlat: a descriptor and its flat extent; → raw adopts the extent (its rename onto the descriptor is the commit point)'],
    make: (d) => {
      create(d, ['-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'flat.vmdk', '1M']);
      io(d, 'flat.vmdk', 'vmdk', ['write -P 0xda 0 64k', 'write -P 0xdb 900k 4k']);
      return { image: 'flat.vmdk', others: ['flat-flat.vmdk'], dataFile: 'flat-flat.vmdk' };
    },
  },
  // ---- VHD sources ----
  {
    name: 'vhd-fixed',
    variants: [full(FLAT)],
    format: 'vhd',
    traits: ['data under the target header region (fixed: data from offset 0)'],
    make: (d) => {
      create(d, ['-f', 'vpc', '-o', 'subformat=fixed,force_size=on', 'fixed.vhd', '256k']);
      io(d, 'fixed.vhd', 'vpc', ['write -P 0x15 0 16k', 'write -P 0x16 128k 8k', 'write -P 0x17 252k 4k']);
      return { image: 'fixed.vhd', others: [] };
    },
  },
  {
    name: 'vhd-dynamic',
    variants: [full(FLAT), full(VHD_FIXED)],
    format: 'vhd',
    traits: ['relocation (dynamic: block data after a sector bitmap)'],
    make: (d) => {
      create(d, ['-f', 'vpc', '-o', 'force_size=on', 'dyn.vhd', '2M']);
      io(d, 'dyn.vhd', 'vpc', ['write -P 0x25 0 12k', 'write -P 0x26 1M 4k', 'write -P 0x27 1984k 64k']);
      return { image: 'dyn.vhd', others: [] };
    },
  },
  {
    name: 'vhd-diff',
    format: 'vhd',
    qemuReadsSource: false,
    traits: ['backing file (differencing over a dynamic parent)'],
    make: (d) => {
      // qemu-img cannot create a differencing VHD; the child is laid out as QEMU would (the VHD
      // tests' builder), with whole 64 KiB runs present so no target cluster mixes the two layers.
      create(d, ['-f', 'vpc', '-o', 'force_size=on', 'vparent.vhd', '2M']);
      io(d, 'vparent.vhd', 'vpc', ['write -P 0x35 0 256k', 'write -P 0x36 1M 64k']);
      const pf = decodeFooter(new Uint8Array(readFileSync(join(d, 'vparent.vhd')).subarray(0, 512)));
      const run = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);
      const child = buildDynamic({
        virtualSize: Number(pf.currentSize),
        creatorApp: pf.creatorApp,
        geometry: pf.geometry,
        diskType: DISK_DIFFERENCING,
        // 512 KiB blocks keep the child small; block 2 covers the parent's second run.
        blockSize: 512 * K,
        blocks: new Map([[0, { present: [...run(128, 128), ...run(512, 256)], data: 0x37 }], [2, { present: run(0, 128), data: 0x38 }]]),
        parentUuid: pf.uuid,
        parentName: 'vparent.vhd',
        locators: [{ code: 'W2ru', bytes: encodeUtf16('.\\vparent.vhd', 'le') }],
        uuid: UUID_B,
      });
      writeFileSync(join(d, 'vdiff.vhd'), child.bytes);
      return { image: 'vdiff.vhd', others: ['vparent.vhd'] };
    },
  },
];

/**
 * Run by the full set (IMGCONV_CRASH_SET=extra runs only these). Two more per source format: other
 * qcow2 versions and refcount widths, QED table sizes and a qcow2 backing file, dense and tail-only
 * raw, zeroed VMDK grains, a dense fixed VHD and a dynamic VHD with data only mid-disk. Then fixtures
 * for the pairs whose conversions are short, each limited to those pairs' targets: layouts that make a
 * conversion relocate many units (reverse-ordered clusters and grains: → raw relocates in several
 * rounds through scratch), and the families below. None above 4 MiB: a state costs about its size
 * (copied, digested, guest SHA-256 taken), and 16 MiB fixtures made the full run too long for two cores.
 */
export const EXTRA_SPECS: Spec[] = [
  {
    name: 'qcow2-v2',
    format: 'qcow2',
    traits: ['qcow2 v2 (compat=0.10), 64 KiB clusters'],
    make: (d) => {
      create(d, ['-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '2M']);
      io(d, 'v2.qcow2', 'qcow2', ['write -P 0x12 128k 200k', 'write -P 0x13 1984k 64k']);
      return { image: 'v2.qcow2', others: [] };
    },
  },
  {
    name: 'qcow2-refcount1',
    format: 'qcow2',
    traits: ['refcount_bits=1, 16 KiB clusters', 'zero clusters'],
    make: (d) => {
      create(d, ['-f', 'qcow2', '-o', 'refcount_bits=1,cluster_size=16384', 'rc1.qcow2', '1M']);
      io(d, 'rc1.qcow2', 'qcow2', ['write -P 0x14 0 48k', 'write -z 256k 32k', 'write -P 0x15 1008k 16k']);
      return { image: 'rc1.qcow2', others: [] };
    },
  },
  {
    name: 'qed-c16k',
    format: 'qed',
    traits: ['16 KiB clusters, 4-cluster tables'],
    make: (d) => {
      create(d, ['-f', 'qed', '-o', 'cluster_size=16384,table_size=4', 'c16k.qed', '1M']);
      io(d, 'c16k.qed', 'qed', ['write -P 0x53 16k 32k', 'write -P 0x54 512k 16k']);
      return { image: 'c16k.qed', others: [] };
    },
  },
  {
    name: 'qed-child-qcow2',
    format: 'qed',
    traits: ['backing file (qcow2 base)'],
    make: (d) => {
      create(d, ['-f', 'qcow2', '-o', 'cluster_size=4096', 'qbase.qcow2', '1M']);
      io(d, 'qbase.qcow2', 'qcow2', ['write -P 0x65 0 96k', 'write -P 0x66 800k 32k']);
      qemuImg(['create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'qbase.qcow2', '-F', 'qcow2', join(d, 'childq.qed'), '1M']);
      io(d, 'childq.qed', 'qed', ['write -P 0x67 16k 8k', 'write -P 0x68 900k 8k']);
      return { image: 'childq.qed', others: ['qbase.qcow2'] };
    },
  },
  {
    name: 'raw-dense',
    format: 'raw',
    traits: ['fully allocated', 'data under the target header region'],
    make: (d) => {
      raw(d, 'dense.raw', 512 * K, [[0, 256 * K, 0x84], [256 * K, 256 * K, 0x85]]);
      return { image: 'dense.raw', others: [] };
    },
  },
  {
    name: 'raw-tail',
    format: 'raw',
    traits: ['data only mid-disk and at the end'],
    make: (d) => {
      raw(d, 'tail.raw', 3 * M, [[M + 4 * K, 12 * K, 0x86], [3 * M - 8 * K, 8 * K, 0x87]]);
      return { image: 'tail.raw', others: [] };
    },
  },
  {
    name: 'vmdk-zeroed',
    format: 'vmdk',
    traits: ['zeroed grains (zeroed_grain=on)'],
    make: (d) => {
      create(d, ['-f', 'vmdk', '-o', 'zeroed_grain=on', 'zeroed.vmdk', '2M']);
      io(d, 'zeroed.vmdk', 'vmdk', ['write -P 0xd3 0 128k', 'write -z 64k 64k', 'write -P 0xd4 1M 64k']);
      return { image: 'zeroed.vmdk', others: [] };
    },
  },
  {
    name: 'vmdk-spread',
    format: 'vmdk',
    traits: ['monolithicSparse, data spread over 4 MiB'],
    make: (d) => {
      create(d, ['-f', 'vmdk', 'spread.vmdk', '4M']);
      io(d, 'spread.vmdk', 'vmdk', ['write -P 0xd5 64k 64k', 'write -P 0xd6 2M 128k', 'write -P 0xd7 4032k 64k']);
      return { image: 'spread.vmdk', others: [] };
    },
  },
  {
    name: 'vhd-fixed-dense',
    variants: [full(FLAT)],
    format: 'vhd',
    traits: ['fixed, fully written', 'data under the target header region'],
    make: (d) => {
      create(d, ['-f', 'vpc', '-o', 'subformat=fixed,force_size=on', 'fdense.vhd', '512k']);
      io(d, 'fdense.vhd', 'vpc', ['write -P 0x18 0 256k', 'write -P 0x19 256k 256k']);
      return { image: 'fdense.vhd', others: [] };
    },
  },
  {
    name: 'vhd-dynamic-mid',
    format: 'vhd',
    traits: ['relocation (dynamic)', 'data only mid-disk'],
    make: (d) => {
      create(d, ['-f', 'vpc', '-o', 'force_size=on', 'dmid.vhd', '2M']);
      io(d, 'dmid.vhd', 'vpc', ['write -P 0x28 768k 36k']);
      return { image: 'dmid.vhd', others: [] };
    },
  },
  // ---- Added for pairs whose conversions are short (issue 5: ≥ 10,000 distinct states per pair) ----
  {
    name: 'qed-c64k-shuffled',
    format: 'qed',
    targets: ['raw', 'vhd'],
    traits: ['relocation (64 KiB clusters written in reverse guest order: → raw moves every cluster, some through scratch)'],
    make: (d) => {
      create(d, ['-f', 'qed', 'c64ks.qed', '2M']);
      const cmds: string[] = [];
      for (let i = 7; i >= 0; i--) cmds.push(`write -P ${0x60 + i} ${i * 256}k 64k`);
      io(d, 'c64ks.qed', 'qed', cmds);
      return { image: 'c64ks.qed', others: [] };
    },
  },
  {
    name: 'vhd-dynamic-spread',
    format: 'vhd',
    targets: ['raw'],
    traits: ['dynamic, data in three blocks out of guest order (→ raw: two steps, relocated)'],
    make: (d) => {
      create(d, ['-f', 'vpc', '-o', 'force_size=on', 'spread.vhd', '6M']);
      io(d, 'spread.vhd', 'vpc', ['write -P 0x2a 4M 20k', 'write -P 0x2b 0 8k', 'write -P 0x2c 2M 12k']);
      return { image: 'spread.vhd', others: [] };
    },
  },
  {
    name: 'vmdk-shuffled',
    format: 'vmdk',
    targets: ['raw', 'qcow2'],
    traits: ['relocation (grains written in reverse guest order: → raw moves every grain, some through scratch)'],
    make: (d) => {
      create(d, ['-f', 'vmdk', 'shuf.vmdk', '2M']);
      const cmds: string[] = [];
      for (let i = 15; i >= 0; i--) cmds.push(`write -P ${0x70 + i} ${i * 128}k 64k`);
      io(d, 'shuf.vmdk', 'vmdk', cmds);
      return { image: 'shuf.vmdk', others: [] };
    },
  },
];

/**
 * Families for the pairs whose conversions are short. A conversion to VMDK leaves the data where it
 * lies (but for the grain under the header, or grains a source cannot give whole) and writes a header,
 * a descriptor, a grain directory and the grain tables: about 20 operations and 300–900 distinct crash
 * states a fixture; QED → qcow2 is alike. Those pairs reach 10,000 states over many layouts instead of
 * more sampling of the same states. Members vary the cluster size, table size, disk size and where the
 * data runs lie (so headers, tables and journals differ); some have zero clusters.
 */
function family(prefix: string, format: string, count: number, targets: (i: number) => string[], trait: (i: number) => string, make: (d: string, i: number) => string): Spec[] {
  return Array.from({ length: count }, (_, i) => ({
    name: `${prefix}-${i}`,
    format,
    targets: targets(i),
    traits: [`${prefix} family: ${trait(i)}`],
    make: (d: string) => ({ image: make(d, i), others: [] }),
  }));
}

/** Two to four data runs of 4–20 KiB in a disk of `sizeK` KiB, at places that depend on `i`. */
const runsOf = (i: number, sizeK: number): [number, number][] =>
  Array.from({ length: 2 + (i % 3) }, (_, j) => [Math.floor((((j * 389 + i * 131) * 4) % (sizeK - 64)) / 4) * 4, 4 * (1 + ((i + j) % 5))] as [number, number]);

const qedCluster = (i: number) => [4, 8, 16, 32, 64][i % 5]! * K;
const qedTable = (i: number) => [2, 4, 8, 16][Math.floor(i / 5) % 4]!;
const sizeKOf = (i: number) => (1 + (i % 4)) * 1024;

EXTRA_SPECS.push(
  // QED → qcow2 as well for the 64 KiB-cluster members (their qcow2 tables are whole 64 KiB clusters).
  ...family('qed-family', 'qed', 42, (i) => (i % 5 === 4 ? ['vmdk', 'qcow2'] : ['vmdk']), (i) => `${qedCluster(i) / K} KiB clusters, ${qedTable(i)}-cluster tables, ${sizeKOf(i) / 1024} MiB${i % 3 === 0 ? ', zero clusters' : ''}`, (d, i) => {
    const sizeK = sizeKOf(i);
    create(d, ['-f', 'qed', '-o', `cluster_size=${qedCluster(i)},table_size=${qedTable(i)}`, `fam${i}.qed`, `${sizeK}k`]);
    const cmds = runsOf(i, sizeK).map(([at, len], j) => `write -P ${0x30 + ((i * 4 + j) % 200)} ${at}k ${len}k`);
    if (i % 3 === 0) cmds.push(`write -z ${sizeK - 128}k 64k`);
    io(d, `fam${i}.qed`, 'qed', cmds);
    return `fam${i}.qed`;
  }),
  // Raw and fixed VHD: data from offset 0 (the grain under the VMDK header moves) and elsewhere.
  ...family('raw-family', 'raw', 11, (i) => (i < 2 ? ['vmdk', 'qcow2'] : ['vmdk']), (i) => `${sizeKOf(i) / 1024} MiB, ${6 + 3 * i} KiB from offset 0 (under the target header)`, (d, i) => {
    const sizeK = sizeKOf(i);
    raw(d, `fam${i}.raw`, sizeK * K, [[0, (6 + 3 * i) * K, 0xa0 + i], ...runsOf(i, sizeK).map(([at, len], j): [number, number, number] => [(at + 64) * K, len * K - 512 * j, 0xb0 + i + j])].map(([o, l, v]) => [o, Math.min(l, sizeK * K - o), v]));
    return `fam${i}.raw`;
  }),
  ...family('vhd-fixed-family', 'vhd', 11, () => ['vmdk'], (i) => `fixed, ${sizeKOf(i) / 1024} MiB, ${6 + 3 * i} KiB from offset 0 (under the target header)`, (d, i) => {
    const sizeK = sizeKOf(i);
    create(d, ['-f', 'vpc', '-o', 'subformat=fixed,force_size=on', `fam${i}.vhd`, `${sizeK}k`]);
    io(d, `fam${i}.vhd`, 'vpc', [`write -P ${0xc0 + i} 0 ${6 + 3 * i}k`, ...runsOf(i, sizeK).map(([at, len], j) => `write -P ${0xd0 + i + j} ${Math.min(at + 64, sizeK - len)}k ${len}k`)]);
    return `fam${i}.vhd`;
  }),
  // qcow2 with 512 B clusters: every grain a VMDK target points at is copied whole.
  ...family('qcow2-c512-family', 'qcow2', 6, (i) => (i === 0 ? ['vmdk', 'vhd'] : ['vmdk']), (i) => `512 B clusters, ${sizeKOf(1 - (i % 2)) / 1024} MiB, runs written in reverse order`, (d, i) => {
    const sizeK = sizeKOf(1 - (i % 2));
    create(d, ['-f', 'qcow2', '-o', 'cluster_size=512', `fam${i}.qcow2`, `${sizeK}k`]);
    io(d, `fam${i}.qcow2`, 'qcow2', runsOf(i + 7, sizeK).reverse().map(([at, len], j) => `write -P ${0xe0 + i + j} ${at}k ${len}k`));
    return `fam${i}.qcow2`;
  }),
  // monolithicSparse VMDK → qcow2.
  ...family('vmdk-family', 'vmdk', 2, () => ['qcow2'], (i) => `monolithicSparse, ${sizeKOf(i + 1) / 1024} MiB`, (d, i) => {
    const sizeK = sizeKOf(i + 1);
    create(d, ['-f', 'vmdk', `fam${i}.vmdk`, `${sizeK}k`]);
    io(d, `fam${i}.vmdk`, 'vmdk', runsOf(i + 3, sizeK).map(([at, len], j) => `write -P ${0xf0 + i + j} ${at}k ${len}k`));
    return `fam${i}.vmdk`;
  }),
);

// VHD fixed → dynamic, within the format (-o subformat=dynamic): every block gets a bitmap sector in
// front of it, so the data moves. Full set only.
EXTRA_SPECS.push(
  ...family('vhd-fixed-to-dynamic', 'vhd', 12, () => ['vhd'], (i) => `fixed → dynamic (-o subformat=dynamic), ${sizeKOf(i) / 1024} MiB`, (d, i) => {
    const sizeK = sizeKOf(i);
    create(d, ['-f', 'vpc', '-o', 'subformat=fixed,force_size=on', `f2d${i}.vhd`, `${sizeK}k`]);
    io(d, `f2d${i}.vhd`, 'vpc', runsOf(i + 11, sizeK).map(([at, len], j) => `write -P ${0x40 + i + j} ${at}k ${len}k`));
    return `f2d${i}.vhd`;
  }).map((s) => ({ ...s, options: { vhd: { subformat: 'dynamic' } } })),
);

/**
 * The zero-copy targets (raw → VMDK monolithicFlat: a descriptor file beside the data; raw → VHD fixed: a
 * footer appended; raw → qcow2 with the image as its raw data file: a metadata file beside it; VHD fixed →
 * monolithicFlat) write a journal, one small companion or footer and nothing
 * else: 15–20 operations and about 100 distinct crash states a fixture. Their rows reach 10,000 states over
 * many sizes and layouts (the descriptor's extent size, the footer's size and geometry, the file's length
 * and sparseness differ), each stopped by the quota once its row has enough.
 */
EXTRA_SPECS.push(
  ...family('raw-zero-copy', 'raw', 100, () => ['vmdk', 'vhd', 'qcow2'], (i) => `${sizeKOf(i) + 4 * i} KiB${i % 7 === 3 ? ' + 300 B (partial last sector)' : ''}, zero-copy targets`, (d, i) => {
    const size = (sizeKOf(i) + 4 * i) * K + (i % 7 === 3 ? 300 : 0);
    raw(d, `zc${i}.raw`, size, [[0, (1 + (i % 5)) * 512, 0x10 + (i % 200)], ...runsOf(i, sizeKOf(i)).map(([at, len], j): [number, number, number] => [at * K, Math.min(len * K, size - at * K), 0x20 + ((i + j) % 200)])]);
    return `zc${i}.raw`;
  }).flatMap((s): Spec[] => [
    { ...s, name: `${s.name}@flat`, targets: ['vmdk'], options: { vmdk: FLAT.options } },
    { ...s, name: `${s.name}@fixed`, targets: ['vhd'], options: { vhd: VHD_FIXED.options } },
    { ...s, name: `${s.name}@datafile`, targets: ['qcow2'], options: { qcow2: DATA_FILE.options } },
  ]),
  ...family('vhd-fixed-zero-copy', 'vhd', 100, () => ['vmdk'], (i) => `fixed, ${sizeKOf(i) + 64 * (i % 20)} KiB → monolithicFlat`, (d, i) => {
    const sizeK = sizeKOf(i) + 64 * (i % 20);
    create(d, ['-f', 'vpc', '-o', 'subformat=fixed,force_size=on', `zc${i}.vhd`, `${sizeK}k`]);
    io(d, `zc${i}.vhd`, 'vpc', runsOf(i + 5, sizeK).map(([at, len], j) => `write -P ${0x30 + ((i + j) % 200)} ${at}k ${len}k`));
    return `zc${i}.vhd`;
  }).map((s) => ({ ...s, options: { vmdk: FLAT.options } })),
);

/**
 * Run by IMGCONV_CRASH_SET=more (and by 'all'): since copies stay as sparse as their source (only data
 * sectors are written), a conversion to VHD writes little for a fixture with little data, and the
 * → VHD pairs fell short. These hold 1.5–2 MiB of data that the VHD target must copy into its blocks
 * (clusters and grains in reverse guest order, or raw data under the VHD header and block bitmap).
 */
export const MORE_SPECS: Spec[] = [0, 1].flatMap((i): Spec[] => {
  const chunks = 24 + 8 * i; // 64 KiB chunks of a 2 MiB disk: 1.5 or 2 MiB of data
  const reversed = (fill: number) => Array.from({ length: chunks }, (_, k) => chunks - 1 - k).map((k) => `write -P ${fill + (k % 32)} ${k * 64}k 64k`);
  return [
    {
      name: `qcow2-dense-reversed-${i}`,
      format: 'qcow2',
      targets: ['vhd'],
      traits: [`64 KiB clusters, ${chunks * 64} KiB written in reverse guest order (→ VHD copies every cluster)`],
      make: (d) => {
        create(d, ['-f', 'qcow2', `dense${i}.qcow2`, '2M']);
        io(d, `dense${i}.qcow2`, 'qcow2', reversed(0x20 + i));
        return { image: `dense${i}.qcow2`, others: [] };
      },
    },
    {
      name: `qed-dense-reversed-${i}`,
      format: 'qed',
      targets: ['vhd'],
      traits: [`64 KiB clusters, ${chunks * 64} KiB written in reverse guest order (→ VHD copies every cluster)`],
      make: (d) => {
        create(d, ['-f', 'qed', `dense${i}.qed`, '2M']);
        io(d, `dense${i}.qed`, 'qed', reversed(0x40 + i));
        return { image: `dense${i}.qed`, others: [] };
      },
    },
    {
      name: `vmdk-dense-reversed-${i}`,
      format: 'vmdk',
      targets: ['vhd'],
      traits: [`monolithicSparse, ${chunks * 64} KiB written in reverse guest order (→ VHD copies every grain)`],
      make: (d) => {
        create(d, ['-f', 'vmdk', `dense${i}.vmdk`, '2M']);
        io(d, `dense${i}.vmdk`, 'vmdk', reversed(0x60 + i));
        return { image: `dense${i}.vmdk`, others: [] };
      },
    },
    {
      name: `raw-dense-${i}`,
      format: 'raw',
      targets: ['vhd'],
      traits: [`${chunks * 64} KiB of data from offset 0 (under the VHD header; → VHD copies it into blocks)`],
      make: (d) => {
        raw(d, `dense${i}.raw`, 2 * M, Array.from({ length: chunks }, (_, k): [number, number, number] => [k * 64 * K, 64 * K, 0x80 + i + (k % 32)]));
        return { image: `dense${i}.raw`, others: [] };
      },
    },
  ];
});

export type FixtureSet = 'base' | 'extra' | 'more' | 'all';

/** The CI sample uses the base set; the full set both (IMGCONV_CRASH_SET overrides). */
export function fixtureSet(): FixtureSet {
  const env = process.env.IMGCONV_CRASH_SET;
  if (env === 'base' || env === 'extra' || env === 'more' || env === 'all') return env;
  return process.env.IMGCONV_CRASH_FULL === '1' ? 'all' : 'base';
}

export const QEMU_FORMAT: Record<string, string> = { qcow2: 'qcow2', qed: 'qed', raw: 'raw', vmdk: 'vmdk', vhd: 'vpc' };

function specsOf(set: FixtureSet): Spec[] {
  return set === 'base' ? SPECS : set === 'extra' ? EXTRA_SPECS : set === 'more' ? MORE_SPECS : [...SPECS, ...EXTRA_SPECS, ...MORE_SPECS];
}

/** Formats a fixture of `format` in the current set converts to within its own format (with options). */
export function withinFormatTargets(format: string, set: FixtureSet = fixtureSet()): string[] {
  const specs = specsOf(set);
  const fullRun = process.env.IMGCONV_CRASH_FULL === '1';
  const within = (s: Spec) => s.targets?.includes(format) || (s.variants ?? []).some((v) => v.to === format && (fullRun || !v.full));
  return specs.some((s) => s.format === format && within(s)) ? [format] : [];
}

/** Builds the fixtures of one source format (all formats when `format` is undefined) of a set. */
export function buildFixtures(format?: string, set: FixtureSet = fixtureSet(), only?: ReadonlySet<string>): Fixture[] {
  const tmp = withTmpDir('imgconv-crashfx-');
  const specs = specsOf(set);
  // `only`: fixture names (a variant as name@label); the specs they come from are the only ones made.
  const wanted = only && new Set([...only].map((n) => n.split('@')[0]!));
  try {
    const fullRun = process.env.IMGCONV_CRASH_FULL === '1';
    const fixtures = specs.filter((s) => (format === undefined || s.format === format) && (!wanted || wanted.has(s.name))).flatMap((s) => {
      const dir = join(tmp.dir, s.name);
      mkdirSync(dir, { recursive: true });
      const { image, others, dataFile } = s.make(dir);
      const files: Files = new Map();
      const memDir = `/mem/${s.name}`;
      for (const f of [image, ...others]) files.set(`${memDir}/${f}`, new Uint8Array(readFileSync(join(dir, f))));
      const fx: Fixture = {
        name: s.name,
        format: s.format,
        image: `${memDir}/${image}`,
        files,
        traits: s.traits,
        qemuFormat: QEMU_FORMAT[s.format]!,
        qemuReadsSource: s.qemuReadsSource ?? true,
        ...(s.targets ? { targets: s.targets } : {}),
        ...(s.options ? { options: s.options } : {}),
        ...(s.convert ? { convert: s.convert } : {}),
        ...(s.rounds !== undefined ? { rounds: s.rounds } : {}),
        ...(dataFile !== undefined ? { dataFile: `${memDir}/${dataFile}` } : {}),
        ...(s.sourceLabel !== undefined ? { sourceLabel: s.sourceLabel } : {}),
      };
      const variants = (s.variants ?? []).filter((v) => fullRun || !v.full);
      return [
        fx,
        ...variants.map((v): Fixture => {
          const { options: _options, convert: _convert, rounds: _rounds, ...common } = fx;
          const what = [...(v.options ? [`-o ${Object.entries(v.options).map(([k, x]) => `${k}=${x}`).join(',')}`] : []), ...(v.convert?.relocationWindow !== undefined ? [`relocation window ${v.convert.relocationWindow / K} KiB`] : [])];
          return {
            ...common,
            name: `${s.name}@${v.label}`,
            traits: [...s.traits, `→ ${v.to} ${what.join(', ')}`],
            targets: [v.to],
            ...(v.options ? { options: { [v.to]: v.options } } : {}),
            ...(v.convert ? { convert: v.convert } : {}),
            ...(v.rounds !== undefined ? { rounds: v.rounds } : {}),
          };
        }),
      ];
    });
    return only ? fixtures.filter((f) => only.has(f.name)) : fixtures;
  } finally {
    tmp.cleanup();
  }
}
