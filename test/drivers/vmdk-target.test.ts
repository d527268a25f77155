/**
 * VMDK monolithicSparse as a conversion target: the real engine (convertInPlace) on images qemu-img
 * made, judged by qemu-img itself (compare, check, info, and writes through QEMU afterwards); build()
 * alone on synthetic mappings, judged by the read driver; a delta over a VMDK parent built by hand
 * (the engine passes the parent's CID; a missing parent is refused); option and parent refusals before any write.
 */
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { vmdkDriver } from '../../drivers/vmdk/index.js';
import { decodeDescriptor } from '../../drivers/vmdk/descriptor.js';
import { decodeSparseHeader, FLAG_RGD, FLAG_ZERO_GRAIN } from '../../drivers/vmdk/header.js';
import { FIXED_BYTES, grainize, vmdkTarget, type VmdkPlanInput } from '../../drivers/vmdk/target.js';
import { FileBlockDevice } from '../../src/blockdev/file.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import type { ImageInfo, TargetBuild } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import { convertInPlace, overlayMoves, planConversion, ConversionFailedError, type ConversionReport, type DataMove } from '../../src/engine/convert.js';
import { holesAsData, scanHoles } from '../../src/engine/holes.js';
import { guestEquivalent } from '../../src/engine/mapping.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import { openImage } from '../../src/image.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const haveQemu = qemuAvailable();

interface Judged {
  report: ConversionReport;
  dataMoveBytes: number;
  info: Record<string, unknown>;
}

/**
 * Plans, converts `file` (format `srcFmt`) to VMDK in place after keeping a copy beside it, then holds
 * the result against the copy with qemu-img: identical content, clean check, vmdk of the same size,
 * and the plan is what was done.
 */
async function convertAndJudge(file: string, srcFmt: string, options: Record<string, string> = {}): Promise<Judged> {
  const copy = `${file}.orig`;
  copyFileSync(file, copy);
  const before = JSON.parse(qemuImg(['info', '--output=json', '-f', srcFmt, copy])) as Record<string, unknown>;
  const plan = await planConversion(file, { to: 'vmdk', drivers: allDrivers, options });
  expect(readFileSync(file).equals(readFileSync(copy)), 'plan must not write').toBe(true);
  const report = await convertInPlace(file, { to: 'vmdk', drivers: allDrivers, options });
  expect(report.metadataBytes).toBe(plan.metadataBytes);
  expect(report.dataMoveBytes).toBe(plan.dataMoveBytes);
  expect(report.written.dataBytes).toBe(plan.dataMoveBytes);
  expect(report.written.compactionBytes).toBe(0);
  const cmp = qemuImgStatus(['compare', '-f', srcFmt, '-F', 'vmdk', copy, file]);
  expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  expect(cmp.status).toBe(0);
  const chk = qemuImgStatus(['check', '-f', 'vmdk', file]);
  expect(chk.status, chk.stdout + chk.stderr).toBe(0);
  expect(chk.stdout).toContain('No errors were found');
  const info = JSON.parse(qemuImg(['info', '--output=json', file])) as Record<string, unknown>;
  expect(info.format).toBe('vmdk');
  expect(info['virtual-size']).toBe(before['virtual-size']);
  expect(formatData(info)['create-type']).toBe('monolithicSparse');
  expect(statSync(file).size % 512).toBe(0);
  return { report, dataMoveBytes: plan.dataMoveBytes, info };
}

function formatData(info: Record<string, unknown>): Record<string, unknown> {
  return ((info['format-specific'] as Record<string, unknown> | undefined)?.data ?? {}) as Record<string, unknown>;
}

/** The header and the embedded descriptor of a converted file. */
function headerOf(file: string) {
  const bytes = readFileSync(file).subarray(0, FIXED_BYTES);
  return { header: decodeSparseHeader(bytes.subarray(0, 512)), descriptor: decodeDescriptor(bytes.subarray(512)) };
}

const writes = ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -z 5M 64k', 'write -P 0x33 40M 64k', 'write -P 0x44 63M 1M'];
const qemuMade = (format: string, opts: string[] = [], size = '64M') => (p: string) => {
  qemuImg(['create', '-q', '-f', format, ...(opts.length ? ['-o', opts.join(',')] : []), p, size]);
  qemuIo(p, format, writes);
};

interface Source {
  name: string;
  format: string;
  create: (path: string) => void;
  /** Bytes of data that must move before the commit, when known. */
  moves?: number;
  check?: (j: Judged, file: string) => void;
}

const sources: Source[] = [
  // qcow2 and QED keep their header (and, below 64 KiB clusters, their first tables) in the first
  // 10.5 KiB, never guest data: nothing moves. Grains are sector-addressed, so data need not be
  // grain-aligned, only contiguous over each grain.
  { name: 'qcow2 64k (default)', format: 'qcow2', create: qemuMade('qcow2'), moves: 0, check: (j) => expect(j.report.target.parameters.grain_size).toBe(65536) },
  { name: 'qcow2 v2 (compat=0.10)', format: 'qcow2', create: qemuMade('qcow2', ['compat=0.10']), moves: 0 },
  { name: 'qcow2 4k clusters', format: 'qcow2', create: qemuMade('qcow2', ['cluster_size=4k']), moves: 0 },
  // 512-byte clusters: data clusters lie in host-contiguous 32 KiB runs (between L2 tables) from 18 KiB
  // on, so 4 KiB grains keep all of them.
  { name: 'qcow2 512 B clusters', format: 'qcow2', create: qemuMade('qcow2', ['cluster_size=512']), moves: 0 },
  {
    name: 'qcow2 compressed (decompressed into new space)',
    format: 'qcow2',
    create: (p) => {
      qemuImg(['create', '-q', '-f', 'raw', `${p}.raw`, '16M']);
      qemuIo(`${p}.raw`, 'raw', ['write -P 0x77 0 2M', 'write -P 0x78 9M 1M']);
      qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', `${p}.raw`, p]);
    },
    moves: 3 << 20,
  },
  { name: 'qcow2 odd size 1000448 (a partial last grain)', format: 'qcow2', create: (p) => { qemuImg(['create', '-q', '-f', 'qcow2', p, '1000448']); qemuIo(p, 'qcow2', ['write -P 0x55 0 512k', 'write -P 0x66 999936 512']); }, moves: 0 },
  { name: 'QED 64k (default)', format: 'qed', create: qemuMade('qed'), moves: 0 },
  { name: 'QED 4k clusters', format: 'qed', create: qemuMade('qed', ['cluster_size=4k']), moves: 0 },
  // Raw data sits under the header and descriptor [0, 10752): the grain covering it moves, nothing
  // else. Moving under 1 MiB counts the same as moving nothing when choosing the grain, so the default
  // 64 KiB grain wins over a 4 KiB one that would move 12 KiB.
  { name: 'raw sparse (the first grains move)', format: 'raw', create: qemuMade('raw'), moves: 65536, check: (j) => expect(j.report.target.parameters.grain_size).toBe(65536) },
  // QEMU's VHD: dynamic header at 512, BAT at 1536, block 0's bitmap at 2048 and its data at 2560: the
  // first 64 KiB grain of block 0 (under the header area) moves; every other block stays where it is.
  { name: 'VHD dynamic', format: 'vpc', create: qemuMade('vpc'), moves: 65536 },
  { name: 'VHD fixed (the first grains move; the footer becomes free space)', format: 'vpc', create: qemuMade('vpc', ['subformat=fixed']), moves: 65536 },
];

describe.runIf(haveQemu)('vmdk target: conversions judged by qemu-img', () => {
  for (const s of sources) {
    it(s.name, async () => {
      const t = withTmpDir();
      try {
        const f = t.path('disk.img');
        s.create(f);
        const j = await convertAndJudge(f, s.format);
        if (s.moves !== undefined) expect(j.report.written.dataBytes).toBe(s.moves);
        const { header, descriptor } = headerOf(f);
        expect(header.version).toBe(1);
        expect(header.flags & FLAG_RGD).toBe(0);
        expect(header.descriptorOffset).toBe(1n);
        expect(header.descriptorSize).toBe(20n);
        expect(descriptor.createType).toBe('monolithicSparse');
        expect(descriptor.extents).toEqual([expect.objectContaining({ access: 'RW', type: 'SPARSE', sectors: Number(header.capacity) })]);
        s.check?.(j, f);
      } finally {
        t.cleanup();
      }
    });
  }

  it('QEMU writes to the converted image: new grains, moved grains, the CID rewrite', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('disk.raw');
      qemuMade('raw')(f);
      await convertAndJudge(f, 'raw');
      const copy = `${f}.orig`;
      const more = ['write -P 0xa1 0 4k', 'write -P 0xa2 8k 8k', 'write -P 0xa3 10M 300k', 'write -P 0xa4 63M 4k', 'write -z 3M 8k'];
      // Two opens: QEMU rewrites the descriptor area (a new CID) on the first write of each.
      qemuIo(f, 'vmdk', more.slice(0, 2));
      qemuIo(f, 'vmdk', more.slice(2));
      qemuIo(copy, 'raw', more);
      expect(qemuImgStatus(['compare', '-f', 'raw', '-F', 'vmdk', copy, f]).status).toBe(0);
      expect(qemuImgStatus(['check', '-f', 'vmdk', f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('round trip vmdk → qcow2 → vmdk: nothing moves either way', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('r.img');
      qemuMade('vmdk')(f);
      const orig = t.path('orig.vmdk');
      copyFileSync(f, orig);
      const there = await convertInPlace(f, { to: 'qcow2', drivers: allDrivers });
      expect(there.written.dataBytes).toBe(0);
      expect(qemuImgStatus(['compare', '-f', 'vmdk', '-F', 'qcow2', orig, f]).status).toBe(0);
      const { report } = await convertAndJudge(f, 'qcow2');
      expect(report.written.dataBytes).toBe(0);
      expect(report.target.parameters.grain_size).toBe(65536);
      expect(qemuImgStatus(['compare', '-f', 'vmdk', '-F', 'vmdk', orig, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('round trip vmdk → QED → vmdk: nothing moves either way', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('r.img');
      qemuMade('vmdk')(f);
      const orig = t.path('orig.vmdk');
      copyFileSync(f, orig);
      const there = await convertInPlace(f, { to: 'qed', drivers: allDrivers });
      expect(there.written.dataBytes).toBe(0);
      expect(qemuImgStatus(['compare', '-f', 'vmdk', '-F', 'qed', orig, f]).status).toBe(0);
      const { report } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(qemuImgStatus(['compare', '-f', 'vmdk', '-F', 'vmdk', orig, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('zero clusters without a parent: version 1, read as unallocated zeros', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('z.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
      qemuIo(f, 'qcow2', ['write -P 0xab 0 2M', 'write -z 512k 512k', 'write -z 8M 1M']);
      const { report } = await convertAndJudge(f, 'qcow2');
      expect(report.target.parameters.version).toBe(1);
      expect(headerOf(f).header.version).toBe(1);
    } finally {
      t.cleanup();
    }
  });

  it('zeroed_grain=on: version 2, zero runs become zeroed grains QEMU reports as zero', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('z.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
      qemuIo(f, 'qcow2', ['write -P 0xab 0 2M', 'write -z 512k 512k', 'write -z 8M 1M']);
      const { report } = await convertAndJudge(f, 'qcow2', { zeroed_grain: 'on' });
      expect(report.written.dataBytes).toBe(0);
      const { header } = headerOf(f);
      expect(header.version).toBe(2);
      expect(header.flags & FLAG_ZERO_GRAIN).toBe(FLAG_ZERO_GRAIN);
      const map = JSON.parse(qemuImg(['map', '--output=json', '-f', 'vmdk', f])) as { start: number; length: number; zero: boolean; data: boolean }[];
      expect(map.some((e) => e.start === 8 << 20 && e.length === 1 << 20 && e.zero && !e.data)).toBe(true);
      // QEMU writes into a zeroed grain (it allocates the grain, zero-filled around the write).
      const copy = `${f}.orig`;
      qemuIo(f, 'vmdk', ['write -P 0x5a 8200k 4k']);
      qemuIo(copy, 'qcow2', ['write -P 0x5a 8200k 4k']);
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vmdk', copy, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('adapter_type, hwversion and toolsversion go to the descriptor as qemu-img create writes them', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuMade('qed')(f);
      await convertAndJudge(f, 'qed', { adapter_type: 'lsilogic', hwversion: '7', toolsversion: '12345', subformat: 'monolithicSparse', zeroed_grain: 'off' });
      const { descriptor } = headerOf(f);
      expect(Object.fromEntries(descriptor.ddb)).toEqual({
        'ddb.virtualHWVersion': '7',
        'ddb.geometry.cylinders': String(Math.floor((64 << 20) / (63 * 255 * 512))),
        'ddb.geometry.heads': '255',
        'ddb.geometry.sectors': '63',
        'ddb.adapterType': 'lsilogic',
        'ddb.toolsVersion': '12345',
      });
      // The same keys and values as QEMU's own descriptor for the same options.
      const q = t.path('q.vmdk');
      qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'adapter_type=lsilogic,hwversion=7,toolsversion=12345', q, '64M']);
      expect(headerOf(q).descriptor.ddb).toEqual(descriptor.ddb);
    } finally {
      t.cleanup();
    }
  });

  it('compat6=on means hardware version 6', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qcow2');
      qemuMade('qcow2')(f);
      await convertAndJudge(f, 'qcow2', { compat6: 'on' });
      expect(Object.fromEntries(headerOf(f).descriptor.ddb)['ddb.virtualHWVersion']).toBe('6');
    } finally {
      t.cleanup();
    }
  });
});

describe.runIf(haveQemu)('vmdk target: refusals leave the file byte-identical', () => {
  const cases: [Record<string, string>, string][] = [
    // monolithicFlat is a target now (test/drivers/vmdk-flat-target.test.ts); its descriptor option alone is not
    [{ descriptor: 'x.vmdk' }, 'descriptor'],
    [{ subformat: 'streamOptimized' }, 'streamOptimized'],
    [{ subformat: 'twoGbMaxExtentSparse' }, 'twoGbMaxExtentSparse'],
    [{ subformat: 'bogus' }, 'bogus'],
    [{ zeroed_grain: 'maybe' }, 'zeroed_grain'],
    [{ adapter_type: 'scsi' }, 'adapter_type'],
    [{ hwversion: '7"\nCID=0' }, 'hwversion'],
    [{ hwversion: '7', compat6: 'on' }, 'compat6'],
    [{ toolsversion: 'x' }, 'toolsversion'],
    [{ backing_file: 'x.vmdk' }, 'backing_file'],
    [{ cluster_size: '64k' }, 'cluster_size'],
    [{ bogus: '1' }, 'bogus'],
  ];
  it.each(cases)('%o → UsageError naming %s', async (options, name) => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qcow2');
      qemuMade('qcow2')(f);
      const before = readFileSync(f);
      const err = await convertInPlace(f, { to: 'vmdk', drivers: allDrivers, options }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UsageError);
      expect(err).not.toBeInstanceOf(ConversionFailedError);
      expect((err as Error).message).toContain(name);
      expect(readFileSync(f).equals(before)).toBe(true);
    } finally {
      t.cleanup();
    }
  });

  it('a qcow2 over a raw parent: refused (VMDK parents only), naming qemu-img rebase', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.raw');
      qemuImg(['create', '-q', '-f', 'raw', base, '8M']);
      const f = t.path('child.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', f]);
      qemuIo(f, 'qcow2', ['write -P 0xab 1M 64k']);
      const before = readFileSync(f);
      const err = await convertInPlace(f, { to: 'vmdk', drivers: allDrivers }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnsupportedError);
      expect((err as Error).message).toContain('qemu-img rebase');
      expect((err as Error).message).toContain('raw');
      expect(readFileSync(f).equals(before)).toBe(true);
    } finally {
      t.cleanup();
    }
  });

  it('a qcow2 over a VMDK parent becomes a VMDK delta through the engine (it passes the parent\'s CID); with the parent missing it is refused', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.vmdk');
      qemuImg(['create', '-q', '-f', 'vmdk', base, '8M']);
      qemuIo(base, 'vmdk', ['write -P 0xaa 0 2M']);
      const f = t.path('child.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.vmdk', '-F', 'vmdk', f]);
      qemuIo(f, 'qcow2', ['write -P 0xab 1M 64k']);
      copyFileSync(f, `${f}.orig`);
      const r = await convertInPlace(f, { to: 'vmdk', drivers: allDrivers });
      expect(r.target.parameters.parent_cid).toBeDefined();
      const cmp = qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vmdk', `${f}.orig`, f]);
      expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
      const info = JSON.parse(qemuImg(['info', '--output=json', f])) as Record<string, unknown>;
      expect(info['backing-filename']).toBe('base.vmdk');
      // Without the parent its CID is unknown: refused before any write, naming the way out.
      const g = t.path('orphan.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'gone.vmdk', '-F', 'vmdk', '-u', g, '8M']);
      const before = readFileSync(g);
      const err = await convertInPlace(g, { to: 'vmdk', drivers: allDrivers }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnsupportedError);
      expect((err as Error).message).toContain('CID');
      expect((err as Error).message).toContain('qemu-img rebase');
      expect(readFileSync(g).equals(before)).toBe(true);
    } finally {
      t.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------------
// A delta over a VMDK parent, planned and built by hand with the parent's CID (what the engine would
// do once it passes `backingInfo`), written into the file and judged by qemu-img.

/** PlanInput for an image on disk, as the engine derives it. */
async function planInputOf(path: string, extra: Partial<VmdkPlanInput> = {}): Promise<VmdkPlanInput> {
  const chain = await openImage(path, { drivers: allDrivers, backing: false });
  try {
    const src = chain.layers[0]!;
    const mapping = holesAsData(await src.mapping(), await scanHoles(src.dev));
    return { info: src.info, mapping, hostSpace: await src.hostSpace(), fileSize: await src.dev.size(), options: {}, ...extra };
  } finally {
    await chain.close();
  }
}

/** The engine's steps without its journal: moves copied, tables written, fixed regions last. */
async function applyInPlace(path: string, input: VmdkPlanInput): Promise<{ build: TargetBuild; moves: DataMove[] }> {
  const plan = vmdkTarget.plan(input);
  const alloc = new GapAllocator(input.hostSpace.free(), plan.fixedRegions, Math.max(input.fileSize, input.hostSpace.usedEnd()));
  const moves: DataMove[] = plan.mustMove.map((m) => ({ guest: m.guest, length: m.length, to: alloc.alloc(m.length, plan.dataAlignment), reason: m.reason }));
  const build = vmdkTarget.build(plan, { ...input, mapping: overlayMoves(input.mapping, moves) }, alloc);
  expect(build.metadataBytes).toBe(plan.metadataBytes);
  const dev = await FileBlockDevice.open(path, { write: true });
  const chain = await openImage(path, { drivers: allDrivers });
  try {
    const src = chain.layers[0]!;
    for (const m of moves) {
      // Guest bytes of the top layer (no moves over a parent's reads happen in these tests).
      const buf = new Uint8Array(m.length);
      for (const e of input.mapping.range(m.guest, m.length)) {
        if (e.kind === 'data') await src.dataDev.read(buf.subarray(e.guest - m.guest, e.guest - m.guest + e.length), e.host!);
      }
      await dev.write(buf, m.to);
    }
  } finally {
    await chain.close();
  }
  for (const w of [...build.writes, ...build.fixed]) await dev.write(w.bytes, w.offset);
  if ((await dev.size()) < build.finalLength) await dev.truncate(build.finalLength);
  await dev.close();
  return { build, moves };
}

describe.runIf(haveQemu)('vmdk target: a delta over a VMDK parent (build with the parent\'s CID)', () => {
  it('a qcow2 child of a VMDK becomes a VMDK delta QEMU reads through its parent', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.vmdk');
      qemuImg(['create', '-q', '-f', 'vmdk', base, '16M']);
      qemuIo(base, 'vmdk', ['write -P 0x77 0 16M']);
      const f = t.path('child.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.vmdk', '-F', 'vmdk', f]);
      qemuIo(f, 'qcow2', ['write -P 0xab 1M 64k', 'write -z 4M 128k', 'write -P 0xcd 9M 1M']);
      const copy = t.path('copy.qcow2');
      copyFileSync(f, copy);
      const parent = await openImage(base, { drivers: allDrivers, backing: false });
      const backingInfo = parent.layers[0]!.info;
      await parent.close();
      const input = await planInputOf(f, { path: f, backingInfo });
      const plan = vmdkTarget.plan(input);
      expect(plan.parameters.version).toBe(2); // the zero run must not read the parent
      expect(plan.parameters.parent_cid).toBe((backingInfo.details.cid as number).toString(16).padStart(8, '0'));
      expect(plan.parameters.extent).toBe('child.qcow2');
      const { moves } = await applyInPlace(f, input);
      expect(moves).toEqual([]);

      const info = JSON.parse(qemuImg(['info', '--output=json', f])) as Record<string, unknown>;
      expect(info.format).toBe('vmdk');
      expect(info['backing-filename']).toBe('base.vmdk');
      expect(formatData(info)['parent-cid']).toBe(backingInfo.details.cid);
      const cmp = qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vmdk', copy, f]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      expect(qemuImgStatus(['check', '-f', 'vmdk', f]).status).toBe(0);
      const raw = t.path('out.raw');
      qemuImg(['convert', '-O', 'raw', f, raw]);
      const bytes = readFileSync(raw);
      expect(bytes[0]).toBe(0x77);
      expect(bytes[(1 << 20) + 5]).toBe(0xab);
      expect(bytes[(4 << 20) + 5]).toBe(0);
      expect(bytes[(9 << 20) + 5]).toBe(0xcd);
      // Our reader opens the chain (it checks the parent's CID) and finds the same guest mapping.
      const chain = await openImage(f, { drivers: allDrivers });
      try {
        expect(chain.layers).toHaveLength(2);
        expect(guestEquivalent(input.mapping, await chain.layers[0]!.mapping(), true)).toBeNull();
      } finally {
        await chain.close();
      }
      // A parent whose content changed (new CID) is refused by QEMU: the CID is what guards the chain.
      qemuIo(base, 'vmdk', ['write -P 0x78 0 4k']);
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vmdk', copy, f]).status).not.toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('zeroed_grain=off over a parent: the zero runs are written as zero-filled data', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.vmdk');
      qemuImg(['create', '-q', '-f', 'vmdk', base, '8M']);
      qemuIo(base, 'vmdk', ['write -P 0x77 0 8M']);
      const f = t.path('child.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.vmdk', '-F', 'vmdk', f]);
      qemuIo(f, 'qcow2', ['write -P 0xab 0 64k', 'write -z 1M 128k']);
      const copy = t.path('copy.qcow2');
      copyFileSync(f, copy);
      const parent = await openImage(base, { drivers: allDrivers, backing: false });
      const backingInfo = parent.layers[0]!.info;
      await parent.close();
      const input = await planInputOf(f, { path: f, backingInfo, options: { zeroed_grain: 'off' } });
      const plan = vmdkTarget.plan(input);
      expect(plan.parameters.version).toBe(1);
      expect(plan.mustMove).toEqual([{ guest: 1 << 20, length: 128 << 10, reason: expect.stringContaining('zeroed_grain=off') }]);
      await applyInPlace(f, input);
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vmdk', copy, f]).status).toBe(0);
      expect(qemuImgStatus(['check', '-f', 'vmdk', f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------------
// build() on synthetic mappings, through the engine's own allocator and move overlay, decoded with
// the read driver.

interface Synthetic {
  cs: number;
  segments: { kind: 'data' | 'zero' | 'unallocated'; units: number }[];
  /** Host order key and gap (in sectors) before each data segment. */
  hostOrder: number[];
  gaps: number[];
  /** Sector where the first data segment starts: small values put data under the fixed region. */
  firstSector: number;
  /** Shifts one data segment off sector alignment. */
  misalign: number;
  tailSectors: number;
  extraTail: number;
  zeroedGrain: 'on' | 'off' | undefined;
  backing: boolean;
}

const syntheticArb: fc.Arbitrary<Synthetic> = fc.record({
  cs: fc.constantFrom(512, 4096, 65536),
  segments: fc.array(fc.record({ kind: fc.constantFrom('data' as const, 'zero' as const, 'unallocated' as const), units: fc.integer({ min: 1, max: 120 }) }), { minLength: 1, maxLength: 12 }),
  hostOrder: fc.array(fc.nat(1000), { minLength: 12, maxLength: 12 }),
  gaps: fc.array(fc.integer({ min: 0, max: 300 }), { minLength: 12, maxLength: 12 }),
  firstSector: fc.integer({ min: 1, max: 64 }),
  misalign: fc.constantFrom(0, 0, 0, 100),
  tailSectors: fc.nat(127),
  extraTail: fc.nat(40),
  zeroedGrain: fc.constantFrom('on' as const, 'off' as const, undefined),
  backing: fc.boolean(),
});

const PARENT_CID = 0x1234abcd;

function synthesize(s: Synthetic): { map: ExtentMap; hs: HostSpace; fileSize: number } {
  const { cs } = s;
  const total = s.segments.reduce((n, x) => n + x.units, 0);
  const vsize = Math.max(512, total * cs - Math.min(s.tailSectors * 512, cs - 512));
  const dataIdx = s.segments.map((x, i) => (x.kind === 'data' ? i : -1)).filter((i) => i >= 0);
  const order = dataIdx.slice().sort((a, b) => s.hostOrder[a]! - s.hostOrder[b]! || a - b);
  const hostOf = new Map<number, number>();
  let next = s.firstSector * 512;
  order.forEach((i, k) => {
    next += s.gaps[k]! * 512;
    hostOf.set(i, next + (k === 0 ? s.misalign : 0));
    next += s.segments[i]!.units * cs + 512;
  });
  const map = new ExtentMap(vsize);
  let g = 0;
  s.segments.forEach((x, i) => {
    const len = Math.min(x.units * cs, vsize - g);
    if (len <= 0) return;
    map.push({ guest: g, length: len, kind: x.kind, ...(x.kind === 'data' ? { host: hostOf.get(i)! } : {}) });
    g += len;
  });
  const fileSize = next + s.extraTail * 512;
  const hs = new HostSpace('synthetic', fileSize);
  hs.add(0, 512, 'header', 'old header');
  for (const e of map) if (e.kind === 'data') hs.add(e.host!, e.length, 'data', 'data');
  hs.finish();
  return { map, hs, fileSize };
}

const syntheticInfo = (vsize: number): ImageInfo => ({ format: 'synthetic', virtualSize: vsize, dirty: false, corrupt: false, features: [], details: {} });

describe('vmdk target: build() on synthetic mappings', () => {
  propTest.prop([syntheticArb], { numRuns: 80 })('decodes back to the same guest mapping; no overlaps; nothing in the fixed region', async (s) => {
    const { map, hs, fileSize } = synthesize(s);
    const info = syntheticInfo(map.virtualSize);
    if (s.backing) info.backing = { filename: 'base.vmdk', format: 'vmdk' };
    const input: VmdkPlanInput = {
      info,
      mapping: map,
      hostSpace: hs,
      fileSize,
      options: s.zeroedGrain ? { zeroed_grain: s.zeroedGrain } : {},
      ...(s.backing ? { backingInfo: { ...syntheticInfo(map.virtualSize), format: 'vmdk', details: { cid: PARENT_CID } } } : {}),
    };
    const plan = vmdkTarget.plan(input);
    const gs = plan.parameters.grain_size as number;
    expect(gs).toBeGreaterThanOrEqual(4096);
    expect(plan.fixedRegions.reduce((n, r) => n + r.length, 0)).toBe(FIXED_BYTES);
    // The engine refuses to move a range that reads the parent; so would this test.
    if (s.backing && plan.mustMove.some((m) => [...map.range(m.guest, m.length)].some((e) => e.kind === 'unallocated'))) return;

    // As the engine does it: moved data to fresh space, then build on the overlaid mapping.
    const alloc = new GapAllocator(hs.free(), plan.fixedRegions, Math.max(fileSize, hs.usedEnd()));
    const moves: DataMove[] = plan.mustMove.map((m) => ({ guest: m.guest, length: m.length, to: alloc.alloc(m.length, plan.dataAlignment), reason: m.reason }));
    const moved = overlayMoves(map, moves);
    const build = vmdkTarget.build(plan, { ...input, mapping: moved }, alloc);
    expect(build.metadataBytes).toBe(plan.metadataBytes);

    // Tables: outside the fixed region, sector-aligned, disjoint from each other and from the data.
    const ranges: [number, number][] = build.writes.map((w) => [w.offset, w.offset + w.bytes.length]);
    for (const w of build.writes) {
      expect(w.offset).toBeGreaterThanOrEqual(FIXED_BYTES);
      expect(w.offset % 512).toBe(0);
    }
    for (const e of moved) if (e.kind === 'data') ranges.push([e.host!, e.host! + e.length]);
    for (const [a] of ranges) expect(a).toBeGreaterThanOrEqual(FIXED_BYTES);
    ranges.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < ranges.length; i++) expect(ranges[i]![0]).toBeGreaterThanOrEqual(ranges[i - 1]![1]);
    expect(build.fixed.map((w) => [w.offset, w.bytes.length])).toEqual([[0, 512], [512, FIXED_BYTES - 512]]);
    expect(build.finalLength % 512).toBe(0);
    expect(build.finalLength).toBeGreaterThanOrEqual(ranges[ranges.length - 1]![1]);

    // Data that did not have to move stays where it was.
    const movedGuest = (g: number) => plan.mustMove.some((m) => g >= m.guest && g < m.guest + m.length);
    for (const e of map) {
      if (e.kind !== 'data') continue;
      for (const r of moved.range(e.guest, e.length)) {
        if (!movedGuest(r.guest)) expect(r.host).toBe(e.host! + (r.guest - e.guest));
      }
    }

    // The file as it is after the commit, opened by the read driver.
    const dev = new MemoryBlockDevice('synthetic.vmdk');
    await dev.write(new Uint8Array(1), build.finalLength - 1);
    for (const w of [...build.writes, ...build.fixed]) await dev.write(w.bytes, w.offset);
    const img = await vmdkDriver.open(dev, { path: 'synthetic.vmdk', openRelated: () => Promise.reject(new Error('no related files')) });
    expect(img.info.virtualSize).toBe(map.virtualSize);
    expect(img.info.clusterSize).toBe(gs);
    expect(img.info.backing).toEqual(info.backing);
    expect(img.info.details.version).toBe(plan.parameters.version);
    if (s.backing) expect(img.info.details['parent-cid']).toBe(PARENT_CID);
    if (s.zeroedGrain === 'on') expect(img.info.details.version).toBe(2);
    if (s.zeroedGrain === 'off') expect(img.info.details.version).toBe(1);
    expect(guestEquivalent(moved, await img.mapping(), s.backing)).toBeNull();
    const report = await img.check();
    expect(report.messages).toEqual([]);
    expect(report.corruptions + report.checkErrors).toBe(0);
    await img.close();
  });
});

describe('vmdk target: grainize', () => {
  const one = (vsize: number, runs: { length: number; kind: 'data' | 'zero' | 'unallocated'; host?: number }[]) => {
    const m = new ExtentMap(vsize);
    let g = 0;
    for (const r of runs) {
      m.push({ guest: g, ...r });
      g += r.length;
    }
    return m;
  };
  const reserved = [{ start: 0, length: FIXED_BYTES }];

  it('keeps sector-aligned data that is not grain-aligned', () => {
    const m = one(1 << 20, [{ length: 1 << 20, kind: 'data', host: 12800 }]);
    expect(grainize(m, 65536, { reserved, hasBacking: false })).toMatchObject({ mustMove: [], runs: [{ guest: 0, length: 1 << 20, kind: 'data', host: 12800 }] });
  });

  it('moves only the grains whose host bytes meet the fixed region', () => {
    const m = one(1 << 20, [{ length: 1 << 20, kind: 'data', host: 0 }]);
    const g = grainize(m, 4096, { reserved, hasBacking: false });
    expect(g.mustMove).toEqual([{ guest: 0, length: 12288, reason: expect.stringContaining('header') }]);
    expect(g.runs).toEqual([{ guest: 12288, length: (1 << 20) - 12288, kind: 'data', host: 12288 }]);
  });

  it('moves data off sector alignment and grains mixing data with zeros', () => {
    const m = one(256 << 10, [
      { length: 64 << 10, kind: 'data', host: (1 << 20) + 100 },
      { length: 32 << 10, kind: 'data', host: 2 << 20 },
      { length: 32 << 10, kind: 'zero' },
      { length: 128 << 10, kind: 'unallocated' },
    ]);
    const g = grainize(m, 65536, { reserved, hasBacking: false });
    expect(g.mustMove.map((x) => [x.guest, x.length])).toEqual([[0, 65536], [65536, 65536]]);
    expect(g.runs).toEqual([{ guest: 131072, length: 131072, kind: 'unallocated' }]);
  });

  it('a grain of zeros and unallocated reads zeros without a parent, must move with one', () => {
    const m = one(64 << 10, [{ length: 32 << 10, kind: 'zero' }, { length: 32 << 10, kind: 'unallocated' }]);
    expect(grainize(m, 65536, { reserved, hasBacking: false }).runs).toEqual([{ guest: 0, length: 65536, kind: 'zero' }]);
    expect(grainize(m, 65536, { reserved, hasBacking: true }).mustMove).toEqual([{ guest: 0, length: 65536, reason: expect.stringContaining('parent') }]);
  });
});

describe('vmdk target: plan() refusals and choices', () => {
  const input = (vsize: number, over: Partial<VmdkPlanInput> = {}): VmdkPlanInput => {
    const map = new ExtentMap(vsize);
    map.push({ guest: 0, length: vsize, kind: 'unallocated' });
    const hs = new HostSpace('synthetic', 65536);
    hs.add(0, 65536, 'header', 'old header');
    hs.finish();
    return { info: syntheticInfo(vsize), mapping: map, hostSpace: hs, fileSize: 65536, options: {}, ...over };
  };

  it('an empty disk gets QEMU\'s 64 KiB grains, version 1, and the image\'s name on the extent line', () => {
    const p = vmdkTarget.plan(input(1 << 30, { path: '/some/dir/disk.qcow2' }));
    expect(p.parameters).toMatchObject({ subformat: 'monolithicSparse', grain_size: 65536, version: 1, zeroed_grain: false, adapter_type: 'ide', hwversion: '4', extent: 'disk.qcow2' });
    expect(p.mustMove).toEqual([]);
    expect(p.metadataBytes).toBe(FIXED_BYTES + 512 + 32 * 2048);
  });

  it('extent names QEMU would misread are not written as they are', () => {
    expect(vmdkTarget.plan(input(1 << 20, { path: '/d/a"b\nc.img' })).parameters.extent).toBe('a_b_c.img');
    // QEMU finds the parent by strstr(descriptor, "parentFileNameHint").
    expect(vmdkTarget.plan(input(1 << 20, { path: '/d/parentFileNameHint.img' })).parameters.extent).toBe('disk.vmdk');
  });

  it('plan() is deterministic (the CID is derived, not random)', () => {
    const a = vmdkTarget.plan(input(1 << 30));
    const b = vmdkTarget.plan(input(1 << 30));
    expect(a.parameters.cid).toBe(b.parameters.cid);
    expect(a.parameters.cid).not.toBe('ffffffff');
  });

  it('refuses a virtual size that is not a multiple of 512, and capacity 0', () => {
    expect(() => vmdkTarget.plan(input(1000))).toThrow(UnsupportedError);
    const zero = input(512);
    zero.info = syntheticInfo(0);
    zero.mapping = new ExtentMap(0);
    expect(() => vmdkTarget.plan(zero)).toThrow(/capacity 0/);
  });

  it('refuses a file that would end beyond 2 TiB (32-bit sector offsets)', () => {
    const size = 2 ** 41;
    const vsize = 2 ** 41;
    const map = new ExtentMap(vsize);
    map.push({ guest: 0, length: vsize, kind: 'data', host: 0 });
    const hs = new HostSpace('raw', size);
    hs.addMapping(map);
    hs.finish();
    expect(() => vmdkTarget.plan({ info: syntheticInfo(vsize), mapping: map, hostSpace: hs, fileSize: size, options: {} })).toThrow(/2 TiB/);
  });

  it('a parent name that cannot fit in the descriptor, or that is not a VMDK, is refused', () => {
    const vmdkParent = { ...syntheticInfo(1 << 20), format: 'vmdk', details: { cid: 5 } };
    const long = input(1 << 20, { backingInfo: vmdkParent });
    long.info = { ...long.info, backing: { filename: 'p'.repeat(11000) + '.vmdk', format: 'vmdk' } };
    expect(() => vmdkTarget.plan(long)).toThrow(UnsupportedError);
    const qcow2Parent = input(1 << 20, { backingInfo: { ...syntheticInfo(1 << 20), format: 'qcow2' } });
    qcow2Parent.info = { ...qcow2Parent.info, backing: { filename: 'base.img' } };
    expect(() => vmdkTarget.plan(qcow2Parent)).toThrow(/qemu-img rebase/);
    const ok = input(1 << 20, { backingInfo: vmdkParent });
    ok.info = { ...ok.info, backing: { filename: 'base.img' } };
    expect(vmdkTarget.plan(ok).parameters.parent_cid).toBe('00000005');
  });
});
