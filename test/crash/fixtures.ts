/**
 * The source images of the crash harness, built with qemu-img/qemu-io into a temporary folder and
 * loaded into memory under /mem/<fixture>/. Small on purpose (≤ 2 MiB virtual): the harness checks
 * tens of thousands of crash states of each. Per source format there are at least three, covering
 * data under the target's header region, a backing file, and data the target must relocate, where
 * the format admits them (raw has no backing file; qcow2 and QED hold their own header at offset 0).
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo, withTmpDir } from '../support/qemu.js';
import type { Files } from '../support/recording.js';
import { decodeFooter, encodeUtf16 } from '../../drivers/vhd/index.js';
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
}

const K = 1024;
const M = 1024 * 1024;

interface Spec {
  name: string;
  format: string;
  traits: string[];
  qemuReadsSource?: false;
  /** Creates the image (and its backing files) in `dir`; returns the image's file name and the others'. */
  make: (dir: string) => { image: string; others: string[] };
}

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
const create = (dir: string, args: string[]) => qemuImg(['create', '-q', ...args.map((a, i) => (i === args.length - 2 ? join(dir, a) : a))]);

export const SPECS: Spec[] = [
  // ---- qcow2 sources ----
  {
    name: 'qcow2-c512',
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
  // ---- QED sources ----
  {
    name: 'qed-c4k',
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
  // ---- raw sources ----
  {
    name: 'raw-head',
    format: 'raw',
    traits: ['data under the target header region (offset 0)'],
    make: (d) => {
      raw(d, 'head.raw', M, [[0, 12 * K, 0x81], [200 * K, 4 * K, 0x82], [1020 * K, 4 * K, 0x83]]);
      return { image: 'head.raw', others: [] };
    },
  },
  {
    name: 'raw-odd',
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
  // ---- VHD sources ----
  {
    name: 'vhd-fixed',
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
 * Two more per source format, run by the full set (IMGCONV_CRASH_SET=extra runs only these): other
 * qcow2 versions and refcount widths, QED table sizes and a qcow2 backing file, dense and tail-only
 * raw, zeroed VMDK grains, a dense fixed VHD and a dynamic VHD with data only mid-disk.
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
];

export type FixtureSet = 'base' | 'extra' | 'all';

/** The CI sample uses the base set; the full set both (IMGCONV_CRASH_SET overrides). */
export function fixtureSet(): FixtureSet {
  const env = process.env.IMGCONV_CRASH_SET;
  if (env === 'base' || env === 'extra' || env === 'all') return env;
  return process.env.IMGCONV_CRASH_FULL === '1' ? 'all' : 'base';
}

export const QEMU_FORMAT: Record<string, string> = { qcow2: 'qcow2', qed: 'qed', raw: 'raw', vmdk: 'vmdk', vhd: 'vpc' };

/** Builds the fixtures of one source format (all formats when `format` is undefined) of a set. */
export function buildFixtures(format?: string, set: FixtureSet = fixtureSet()): Fixture[] {
  const tmp = withTmpDir('imgconv-crashfx-');
  const specs = set === 'base' ? SPECS : set === 'extra' ? EXTRA_SPECS : [...SPECS, ...EXTRA_SPECS];
  try {
    return specs.filter((s) => format === undefined || s.format === format).map((s) => {
      const dir = join(tmp.dir, s.name);
      mkdirSync(dir, { recursive: true });
      const { image, others } = s.make(dir);
      const files: Files = new Map();
      const memDir = `/mem/${s.name}`;
      for (const f of [image, ...others]) files.set(`${memDir}/${f}`, new Uint8Array(readFileSync(join(dir, f))));
      return { name: s.name, format: s.format, image: `${memDir}/${image}`, files, traits: s.traits, qemuFormat: QEMU_FORMAT[s.format]!, qemuReadsSource: s.qemuReadsSource ?? true };
    });
  } finally {
    tmp.cleanup();
  }
}
