/**
 * qcow2 as a conversion target: the real engine (convertInPlace) on images qemu-img made, judged by
 * qemu-img itself (compare, check, info); build() alone on synthetic mappings, judged by decoding
 * what it wrote; and option refusals before any write.
 */
import { copyFileSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { qcow2Driver } from '../../drivers/qcow2/index.js';
import { qcow2Target } from '../../drivers/qcow2/target.js';
import { decodeHeader } from '../../drivers/qcow2/header.js';
import { decodeL1Entry, decodeL2Entry, decodeReftableEntry, getRefcount } from '../../drivers/qcow2/entries.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import type { Allocator, ImageInfo, PlanInput } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import { convertInPlace, ConversionFailedError, type ConversionReport } from '../../src/engine/convert.js';
import { guestEquivalent } from '../../src/engine/mapping.js';
import { UsageError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const haveQemu = qemuAvailable();

interface Converted {
  report: ConversionReport;
  info: Record<string, unknown>;
  check: Record<string, unknown>;
}

/**
 * Converts `file` (format `srcFmt`) to qcow2 in place after keeping a copy beside it (the copy reads
 * through the same backing file), then holds the result against the copy with qemu-img.
 */
async function convertAndJudge(file: string, srcFmt: string, options: Record<string, string> = {}): Promise<Converted> {
  const copy = `${file}.orig`;
  copyFileSync(file, copy);
  const before = JSON.parse(qemuImg(['info', '--output=json', '-f', srcFmt, copy])) as Record<string, unknown>;
  const report = await convertInPlace(file, { to: 'qcow2', drivers: allDrivers, options });
  const cmp = qemuImgStatus(['compare', '-f', srcFmt, '-F', 'qcow2', copy, file]);
  expect(cmp.stderr + cmp.stdout).toContain('Images are identical');
  expect(cmp.status).toBe(0);
  const chk = qemuImgStatus(['check', '--output=json', '-f', 'qcow2', file]);
  const check = JSON.parse(chk.stdout) as Record<string, unknown>;
  expect(chk.status, chk.stdout + chk.stderr).toBe(0);
  expect(check.corruptions ?? 0).toBe(0);
  expect(check.leaks ?? 0).toBe(0);
  expect(check['check-errors'] ?? 0).toBe(0);
  const info = JSON.parse(qemuImg(['info', '--output=json', file])) as Record<string, unknown>;
  expect(info.format).toBe('qcow2');
  expect(info['virtual-size']).toBe(before['virtual-size']);
  expect(info['backing-filename']).toBe(before['backing-filename']);
  expect(info.dirty ?? false).toBe(false);
  return { report, info, check };
}

function formatData(info: Record<string, unknown>): Record<string, unknown> {
  return ((info['format-specific'] as Record<string, unknown>).data ?? {}) as Record<string, unknown>;
}

describe.runIf(haveQemu)('qcow2 target: conversions judged by qemu-img', () => {
  it('QED with the default 64 KiB clusters: nothing moves', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', f, '64M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 1M', 'write -P 0xcd 10M 3M', 'write -P 0x11 63M 1M']);
      const { report, info } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(formatData(info).compat).toBe('1.1');
      expect(formatData(info)['refcount-bits']).toBe(16);
    } finally {
      t.cleanup();
    }
  });

  it('QED with 4 KiB clusters', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', '-o', 'cluster_size=4096', f, '32M']);
      qemuIo(f, 'qed', ['write -P 0xab 4k 8k', 'write -P 0xcd 1M 100k', 'write -P 0x22 31M 12k']);
      const { report } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(report.target.parameters.cluster_size).toBeLessThanOrEqual(4096);
    } finally {
      t.cleanup();
    }
  });

  it('QED over a raw backing file: the backing file and its format are carried', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.raw');
      qemuImg(['create', '-f', 'raw', base, '16M']);
      qemuIo(base, 'raw', ['write -P 0x77 0 16M']);
      const f = t.path('child.qed');
      qemuImg(['create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', f]);
      qemuIo(f, 'qed', ['write -P 0xab 64k 64k', 'write -P 0xcd 5M 1M']);
      const { report, info } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(info['backing-filename']).toBe('base.raw');
      expect(info['backing-filename-format']).toBe('raw');
      // The chain still reads the backing file where the child has nothing.
      const raw = t.path('out.raw');
      qemuImg(['convert', '-O', 'raw', f, raw]);
      const bytes = readFileSync(raw);
      expect(bytes[0]).toBe(0x77);
      expect(bytes[(64 << 10) + 1]).toBe(0xab);
    } finally {
      t.cleanup();
    }
  });

  it('QED over a qcow2 backing file', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.qcow2');
      qemuImg(['create', '-f', 'qcow2', base, '8M']);
      qemuIo(base, 'qcow2', ['write -P 0x55 0 8M']);
      const f = t.path('child.qed');
      qemuImg(['create', '-f', 'qed', '-b', 'base.qcow2', '-F', 'qcow2', f]);
      qemuIo(f, 'qed', ['write -P 0xab 1M 64k']);
      const { report, info } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(info['backing-filename']).toBe('base.qcow2');
      // Guest bytes outside the child's one write still come from the base.
      const raw = t.path('out.raw');
      qemuImg(['convert', '-O', 'raw', f, raw]);
      const bytes = readFileSync(raw);
      expect(bytes[0]).toBe(0x55);
      expect(bytes[(1 << 20) + 5]).toBe(0xab);
    } finally {
      t.cleanup();
    }
  });

  it('QED with zero clusters becomes v3 zero clusters', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('z.qed');
      qemuImg(['create', '-f', 'qed', f, '16M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 2M', 'write -z 512k 512k', 'write -z 8M 1M']);
      const { report } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      const map = JSON.parse(qemuImg(['map', '--output=json', '-f', 'qcow2', f])) as { start: number; zero: boolean; data: boolean }[];
      expect(map.some((e) => e.start === 8 << 20 && e.zero && !e.data)).toBe(true);
    } finally {
      t.cleanup();
    }
  });

  it('QED of an odd virtual size (1000448 bytes)', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('odd.qed');
      qemuImg(['create', '-f', 'qed', f, '1000448']);
      qemuIo(f, 'qed', ['write -P 0xab 0 64k', 'write -P 0xcd 983040 17408']);
      const { report } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('sparse raw: only the header cluster\'s data moves', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('disk.raw');
      qemuImg(['create', '-f', 'raw', f, '32M']);
      qemuIo(f, 'raw', ['write -P 0xab 0 8k', 'write -P 0xcd 3M 1M', 'write -P 0xef 20M 4k']);
      const { report } = await convertAndJudge(f, 'raw');
      expect(report.written.dataBytes).toBe(report.target.parameters.cluster_size);
    } finally {
      t.cleanup();
    }
  });

  it('VMDK monolithicSparse', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('d.vmdk');
      qemuImg(['create', '-f', 'vmdk', f, '64M']);
      qemuIo(f, 'vmdk', ['write -P 0xab 0 64k', 'write -P 0xcd 7M 256k', 'write -P 0xee 40M 64k']);
      const { report } = await convertAndJudge(f, 'vmdk');
      expect(report.written.dataBytes).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('VHD dynamic', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('d.vhd');
      qemuImg(['create', '-f', 'vpc', f, '64M']);
      qemuIo(f, 'vpc', ['write -P 0xab 0 64k', 'write -P 0xcd 5M 1M', 'write -P 0xee 30M 4k']);
      await convertAndJudge(f, 'vpc');
    } finally {
      t.cleanup();
    }
  });

  it('VHD fixed: the data under the header cluster moves, nothing else', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('f.vhd');
      qemuImg(['create', '-f', 'vpc', '-o', 'subformat=fixed', f, '16M']);
      qemuIo(f, 'vpc', ['write -P 0xab 0 64k', 'write -P 0xcd 5M 1M']);
      const { report } = await convertAndJudge(f, 'vpc');
      expect(report.written.dataBytes).toBe(report.target.parameters.cluster_size);
    } finally {
      t.cleanup();
    }
  });

  it('round trip qcow2 → QED → qcow2', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('r.img');
      qemuImg(['create', '-f', 'qcow2', f, '32M']);
      qemuIo(f, 'qcow2', ['write -P 0xab 0 1M', 'write -P 0xcd 9M 2M', 'write -z 20M 1M']);
      const orig = t.path('orig.qcow2');
      copyFileSync(f, orig);
      await convertInPlace(f, { to: 'qed', drivers: allDrivers });
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qed', orig, f]).status).toBe(0);
      const { report } = await convertAndJudge(f, 'qed');
      expect(report.written.dataBytes).toBe(0);
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'qcow2', orig, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('compat=0.10 without a backing file: zero clusters read as unallocated zeros', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('z.qed');
      qemuImg(['create', '-f', 'qed', f, '16M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 2M', 'write -z 4M 1M']);
      const { report, info } = await convertAndJudge(f, 'qed', { compat: '0.10' });
      expect(report.written.dataBytes).toBe(0);
      expect(formatData(info).compat).toBe('0.10');
    } finally {
      t.cleanup();
    }
  });

  it('compat=0.10 over a backing file: zero clusters are materialised as zero-filled data', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.raw');
      qemuImg(['create', '-f', 'raw', base, '8M']);
      qemuIo(base, 'raw', ['write -P 0x77 0 8M']);
      const f = t.path('child.qed');
      qemuImg(['create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', f]);
      qemuIo(f, 'qed', ['write -P 0xab 0 64k', 'write -z 1M 128k']);
      const { report, info } = await convertAndJudge(f, 'qed', { compat: '0.10' });
      expect(formatData(info).compat).toBe('0.10');
      // The 128 KiB zero range gets clusters of its own (compat=0.10 has no zero flag; left unallocated it
      // would read the backing file's 0x77). QED relocates data units inside itself and this range has
      // none: its new clusters are punched, so they read zeros and nothing is copied.
      expect(report.written.dataBytes).toBe(0);
      const raw = t.path('out.raw');
      qemuImg(['convert', '-O', 'raw', f, raw]);
      const bytes = readFileSync(raw);
      expect(bytes[(1 << 20) + 100]).toBe(0);
      expect(bytes[2 << 20]).toBe(0x77);
    } finally {
      t.cleanup();
    }
  });

  for (const bits of ['1', '64']) {
    it(`refcount_bits=${bits}`, async () => {
      const t = withTmpDir();
      try {
        const f = t.path('a.qed');
        qemuImg(['create', '-f', 'qed', f, '32M']);
        qemuIo(f, 'qed', ['write -P 0xab 0 1M', 'write -P 0xcd 17M 2M']);
        const { report, info } = await convertAndJudge(f, 'qed', { refcount_bits: bits });
        expect(report.written.dataBytes).toBe(0);
        expect(formatData(info)['refcount-bits']).toBe(Number(bits));
      } finally {
        t.cleanup();
      }
    });
  }

  it('cluster_size=4k forced on a 64 KiB-aligned source', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', f, '32M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 1M', 'write -P 0xcd 17M 2M']);
      const { report, info } = await convertAndJudge(f, 'qed', { cluster_size: '4k' });
      expect(report.written.dataBytes).toBe(0);
      expect(info['cluster-size']).toBe(4096);
    } finally {
      t.cleanup();
    }
  });

  it('cluster_size=64k forced on a 64 KiB-aligned source', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', f, '32M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 1M', 'write -P 0xcd 17M 2M']);
      const { report, info } = await convertAndJudge(f, 'qed', { cluster_size: '65536' });
      expect(report.written.dataBytes).toBe(0);
      expect(info['cluster-size']).toBe(65536);
    } finally {
      t.cleanup();
    }
  });

  it('lazy_refcounts=on sets only the compatible bit', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', f, '16M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 1M']);
      const { info } = await convertAndJudge(f, 'qed', { lazy_refcounts: 'on' });
      expect(formatData(info)['lazy-refcounts']).toBe(true);
      const h = decodeHeader(readFileSync(f).subarray(0, 112));
      expect(h.incompatibleFeatures).toBe(0n);
    } finally {
      t.cleanup();
    }
  });
});

describe.runIf(haveQemu)('qcow2 target: bad options are refused before any write', () => {
  const cases: [Record<string, string>, string][] = [
    [{ cluster_size: '3000' }, 'cluster_size'],
    [{ cluster_size: '256' }, 'cluster_size'],
    [{ cluster_size: '4M' }, 'cluster_size'],
    [{ compat: '2.0' }, 'compat'],
    [{ refcount_bits: '3' }, 'refcount_bits'],
    [{ refcount_bits: '128' }, 'refcount_bits'],
    [{ compat: '0.10', refcount_bits: '8' }, 'refcount_bits'],
    [{ lazy_refcounts: 'maybe' }, 'lazy_refcounts'],
    [{ compat: '0.10', lazy_refcounts: 'on' }, 'lazy_refcounts'],
    [{ data_file: 'x.raw' }, 'data_file'],
    [{ preallocation: 'full' }, 'preallocation'],
    [{ encrypt: 'on' }, 'encrypt'],
    [{ 'encrypt.format': 'luks' }, 'encrypt.format'],
    [{ bogus: '1' }, 'bogus'],
  ];
  it.each(cases)('%o → UsageError naming %s, file unchanged', async (options, name) => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qed');
      qemuImg(['create', '-f', 'qed', f, '8M']);
      qemuIo(f, 'qed', ['write -P 0xab 0 64k']);
      const before = readFileSync(f);
      const err = await convertInPlace(f, { to: 'qcow2', drivers: allDrivers, options }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UsageError);
      expect(err).not.toBeInstanceOf(ConversionFailedError);
      expect((err as Error).message).toContain(name);
      expect(readFileSync(f).equals(before)).toBe(true);
    } finally {
      t.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------------
// build() on synthetic mappings, decoded with the read driver.

interface Synthetic {
  cs: number;
  refcountBits: number;
  compat: '1.1' | '0.10';
  segments: { kind: 'data' | 'zero' | 'unallocated'; clusters: number }[];
  /** Permutation key and gap (in clusters) before each data segment in host order. */
  hostOrder: number[];
  gaps: number[];
  tailSectors: number;
  extraTail: number;
  /** v3 only: a backing file (v2 would have to materialise its zero runs, which build() never does). */
  backing: boolean;
  /** Allocate with a hostile (but contract-keeping) allocator that leaps windows ahead every few calls. */
  leaping: boolean;
}

const syntheticArb: fc.Arbitrary<Synthetic> = fc
  .record({
    cs: fc.constantFrom(512, 1024, 4096, 65536),
    refcountBits: fc.constantFrom(1, 2, 4, 8, 16, 32, 64),
    compat: fc.constantFrom('1.1' as const, '0.10' as const),
    segments: fc.array(fc.record({ kind: fc.constantFrom('data' as const, 'zero' as const, 'unallocated' as const), clusters: fc.integer({ min: 1, max: 200 }) }), { minLength: 1, maxLength: 12 }),
    hostOrder: fc.array(fc.nat(1000), { minLength: 12, maxLength: 12 }),
    gaps: fc.array(fc.integer({ min: 0, max: 6 }), { minLength: 12, maxLength: 12 }),
    tailSectors: fc.nat(127),
    extraTail: fc.nat(3),
    backing: fc.boolean(),
    leaping: fc.boolean(),
  })
  .map((s) => ({ ...s, refcountBits: s.compat === '0.10' ? 16 : s.refcountBits, backing: s.backing && s.compat === '1.1' }));

/** The mapping, host space and file size the synthetic source describes. */
function synthesize(s: Synthetic): { map: ExtentMap; hs: HostSpace; fileSize: number } {
  const { cs } = s;
  const totalClusters = s.segments.reduce((n, x) => n + x.clusters, 0);
  const vsize = Math.max(512, totalClusters * cs - Math.min(s.tailSectors * 512, cs - 512));
  // Host places of data segments: in a shuffled order, with free gaps between them, above cluster 0.
  const dataIdx = s.segments.map((x, i) => (x.kind === 'data' ? i : -1)).filter((i) => i >= 0);
  const order = dataIdx.slice().sort((a, b) => (s.hostOrder[a]! - s.hostOrder[b]!) || a - b);
  const hostOf = new Map<number, number>();
  let next = 1;
  order.forEach((i, k) => {
    next += s.gaps[k]!;
    hostOf.set(i, next * cs);
    next += s.segments[i]!.clusters;
  });
  const map = new ExtentMap(vsize);
  let g = 0;
  s.segments.forEach((x, i) => {
    const len = Math.min(x.clusters * cs, vsize - g);
    if (len <= 0) return;
    map.push({ guest: g, length: len, kind: x.kind, ...(x.kind === 'data' ? { host: hostOf.get(i)! } : {}) });
    g += len;
  });
  const fileSize = (next + s.extraTail) * cs;
  const hs = new HostSpace('synthetic', fileSize);
  hs.add(0, cs, 'header', 'old header');
  for (const e of map) if (e.kind === 'data') hs.add(e.host!, Math.ceil(e.length / cs) * cs, 'data', 'data');
  hs.finish();
  return { map, hs, fileSize };
}

/**
 * Keeps the Allocator contract (fresh space past everything, aligned) but leaps `leap` bytes ahead
 * every `every`-th call, so refcount windows keep opening: the fixed point must still close.
 */
class LeapingAllocator implements Allocator {
  private calls = 0;
  constructor(
    private tail: number,
    private readonly every: number,
    private readonly leap: number,
  ) {}
  get end(): number {
    return this.tail;
  }
  alloc(length: number, align: number): number {
    if (++this.calls % this.every === 0) this.tail += this.leap;
    const start = Math.ceil(this.tail / align) * align;
    this.tail = start + length;
    return start;
  }
}

const syntheticInfo = (vsize: number): ImageInfo => ({ format: 'synthetic', virtualSize: vsize, dirty: false, corrupt: false, features: [], details: {} });

describe('qcow2 target: build() on synthetic mappings', () => {
  propTest.prop([syntheticArb], { numRuns: 60 })('exact refcounts, no overlaps, nothing in cluster 0, mapping decodes back', async (s) => {
    const { cs } = s;
    const { map, hs, fileSize } = synthesize(s);
    const info = syntheticInfo(map.virtualSize);
    if (s.backing) info.backing = { filename: 'base.img', format: 'raw' };
    const input: PlanInput = {
      info,
      mapping: map,
      hostSpace: hs,
      fileSize,
      options: { cluster_size: String(cs), refcount_bits: String(s.refcountBits), compat: s.compat },
    };
    const plan = qcow2Target.plan(input);
    expect(plan.mustMove).toEqual([]);
    const start = Math.max(fileSize, hs.usedEnd());
    const alloc = s.leaping ? new LeapingAllocator(start, 3, 64 * cs * 2) : new GapAllocator(hs.free(), [{ start: 0, length: cs }], start);
    const build = qcow2Target.build(plan, input, alloc);
    // plan() simulates the engine's allocator; the leaping one lays things out differently.
    if (!s.leaping) expect(build.metadataBytes).toBe(plan.metadataBytes);

    // Structures: outside cluster 0, cluster-aligned, disjoint from each other and from the data.
    const ranges: [number, number, string][] = build.writes.map((w) => [w.offset, w.offset + w.bytes.length, 'table']);
    for (const w of build.writes) {
      expect(w.offset).toBeGreaterThanOrEqual(cs);
      expect(w.offset % cs).toBe(0);
      expect(w.bytes.length % cs).toBe(0);
    }
    for (const e of map) if (e.kind === 'data') ranges.push([e.host!, e.host! + Math.ceil(e.length / cs) * cs, 'data']);
    ranges.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < ranges.length; i++) expect(ranges[i]![0]).toBeGreaterThanOrEqual(ranges[i - 1]![1]);
    expect(build.fixed).toHaveLength(1);
    expect(build.fixed[0]!.offset).toBe(0);
    expect(build.fixed[0]!.bytes.length).toBe(cs);
    expect(build.finalLength).toBeGreaterThanOrEqual(ranges[ranges.length - 1]![1]);

    // The file as it is after the commit.
    const dev = new MemoryBlockDevice('synthetic.qcow2');
    await dev.write(new Uint8Array(1), Math.max(build.finalLength, fileSize) - 1);
    for (const w of [...build.writes, ...build.fixed]) await dev.write(w.bytes, w.offset);
    const file = new Uint8Array(await dev.size());
    await dev.read(file, 0);

    // Count references independently: header, L1, L2s, data, reftable, refblocks.
    const h = decodeHeader(file.subarray(0, 112));
    const refs = new Map<number, number>();
    const ref = (off: number, clusters = 1) => {
      for (let k = 0; k < clusters; k++) refs.set(off / cs + k, (refs.get(off / cs + k) ?? 0) + 1);
    };
    ref(0);
    ref(h.l1TableOffset, Math.ceil((h.l1Size * 8) / cs));
    ref(h.refcountTableOffset, h.refcountTableClusters);
    const be = new DataView(file.buffer);
    for (let i = 0; i < h.l1Size; i++) {
      const e = decodeL1Entry(be.getUint32(h.l1TableOffset + i * 8), be.getUint32(h.l1TableOffset + i * 8 + 4));
      if (!e.l2Offset) continue;
      expect(e.copied).toBe(true);
      ref(e.l2Offset);
      for (let j = 0; j < cs / 8; j++) {
        const l2e = decodeL2Entry(be.getUint32(e.l2Offset + j * 8), be.getUint32(e.l2Offset + j * 8 + 4), h.clusterBits);
        if (l2e.compressed) throw new Error('compressed entry written');
        if (l2e.offset) {
          expect(l2e.copied).toBe(true);
          ref(l2e.offset);
        }
      }
    }
    const order = h.refcountOrder;
    const perBlock = (cs * 8) / (1 << order);
    const refcountOf = new Map<number, number>();
    for (let w = 0; w < (h.refcountTableClusters * cs) / 8; w++) {
      const at = h.refcountTableOffset + w * 8;
      const e = decodeReftableEntry(be.getUint32(at), be.getUint32(at + 4));
      if (!e.offset) continue;
      ref(e.offset);
      const block = file.subarray(e.offset, e.offset + cs);
      for (let k = 0; k < perBlock; k++) {
        const n = getRefcount(block, k, order);
        if (n) refcountOf.set(w * perBlock + k, n);
      }
    }
    for (const [c, n] of refs) expect({ c, n, rc: refcountOf.get(c) }).toEqual({ c, n: 1, rc: 1 });
    for (const [c] of refcountOf) expect(refs.has(c), `cluster ${c} has a refcount but no reference`).toBe(true);

    // The read driver opens it, reads the same mapping, and its checker is clean.
    const img = await qcow2Driver.open(MemoryBlockDevice.from(file, 'synthetic.qcow2'), {
      path: 'synthetic.qcow2',
      openRelated: () => Promise.reject(new Error('no related files')),
    });
    expect(img.info.virtualSize).toBe(map.virtualSize);
    expect(img.info.backing).toEqual(info.backing);
    expect(guestEquivalent(map, await img.mapping(), s.backing)).toBeNull();
    const report = await img.check();
    expect(report.messages).toEqual([]);
    expect(report.corruptions + report.leaks + report.checkErrors).toBe(0);
    await img.close();
  });
});

describe.runIf(haveQemu)('qcow2 target: refcount structures that span many clusters', () => {
  it('512-byte clusters, 64-bit refcounts, 40 MiB of data: a multi-cluster reftable that qemu-img check accepts', async () => {
    const t = withTmpDir();
    try {
      const cs = 512;
      const vsize = 48 << 20;
      const map = new ExtentMap(vsize);
      map.push({ guest: 0, length: 4 << 20, kind: 'unallocated' });
      map.push({ guest: 4 << 20, length: 40 << 20, kind: 'data', host: 1 << 20 });
      map.push({ guest: 44 << 20, length: 4 << 20, kind: 'zero' });
      const fileSize = 41 << 20;
      const hs = new HostSpace('synthetic', fileSize);
      hs.add(0, cs, 'header', 'old header');
      hs.add(1 << 20, 40 << 20, 'data', 'data');
      hs.finish();
      const input: PlanInput = { info: syntheticInfo(vsize), mapping: map, hostSpace: hs, fileSize, options: { cluster_size: '512', refcount_bits: '64' } };
      const plan = qcow2Target.plan(input);
      const build = qcow2Target.build(plan, input, new GapAllocator(hs.free(), [{ start: 0, length: cs }], fileSize));
      expect(build.metadataBytes).toBe(plan.metadataBytes);
      const h = decodeHeader(build.fixed[0]!.bytes);
      expect(h.refcountTableClusters).toBeGreaterThan(1);
      const f = t.path('big.qcow2');
      const { openSync, writeSync, ftruncateSync, closeSync } = await import('node:fs');
      const fd = openSync(f, 'w');
      ftruncateSync(fd, build.finalLength);
      for (const w of [...build.writes, ...build.fixed]) writeSync(fd, w.bytes, 0, w.bytes.length, w.offset);
      closeSync(fd);
      const chk = qemuImgStatus(['check', '--output=json', '-f', 'qcow2', f]);
      expect(chk.status, chk.stdout + chk.stderr).toBe(0);
      const map2 = JSON.parse(qemuImg(['map', '--output=json', '-f', 'qcow2', f])) as { start: number; length: number; data: boolean; zero: boolean; offset?: number }[];
      const data = map2.filter((e) => e.data);
      expect(data).toEqual([expect.objectContaining({ start: 4 << 20, length: 40 << 20, offset: 1 << 20 })]);
    } finally {
      t.cleanup();
    }
  });
});

describe('qcow2 target: plan() without qemu', () => {
  const empty = (vsize: number, options: Record<string, string> = {}): PlanInput => {
    const map = new ExtentMap(vsize);
    map.push({ guest: 0, length: vsize, kind: 'unallocated' });
    const hs = new HostSpace('synthetic', 65536);
    hs.add(0, 65536, 'header', 'old header');
    hs.finish();
    return { info: syntheticInfo(vsize), mapping: map, hostSpace: hs, fileSize: 65536, options };
  };

  it('an empty disk: v3 with 16-bit refcounts, nothing moves, the plan names cluster 0', () => {
    const plan = qcow2Target.plan(empty(1 << 30));
    const cs = plan.parameters.cluster_size as number;
    expect(plan.parameters).toEqual({ cluster_size: cs, compat: '1.1', refcount_bits: 16, lazy_refcounts: false });
    expect(plan.mustMove).toEqual([]);
    expect(plan.fixedRegions).toEqual([{ start: 0, length: cs, what: 'qcow2 header cluster' }]);
    expect(plan.dataAlignment).toBe(cs);
  });

  it('skips cluster sizes whose L1 table QEMU would refuse', () => {
    // 512-byte clusters map 32 KiB per L1 entry: 4 Mi entries reach 128 GiB.
    expect(() => qcow2Target.plan(empty(256 * 2 ** 30, { cluster_size: '512' }))).toThrow(UsageError);
    expect(qcow2Target.plan(empty(256 * 2 ** 30)).parameters.cluster_size).toBeGreaterThan(512);
  });

  it('a virtual size that is not whole sectors is refused', () => {
    expect(() => qcow2Target.plan(empty(1000))).toThrow(/multiple of 512/);
  });

  it('writes a backing name and format that the read driver decodes', async () => {
    const input = empty(1 << 20);
    input.info.backing = { filename: 'base image.raw', format: 'raw' };
    const plan = qcow2Target.plan(input);
    const alloc = new GapAllocator(input.hostSpace.free(), [{ start: 0, length: 65536 }], 65536);
    const build = qcow2Target.build(plan, input, alloc);
    const dev = new MemoryBlockDevice('b.qcow2');
    await dev.write(new Uint8Array(1), build.finalLength - 1);
    for (const w of [...build.writes, ...build.fixed]) await dev.write(w.bytes, w.offset);
    const img = await qcow2Driver.open(dev, { path: 'b.qcow2', openRelated: () => Promise.reject(new Error('none')) });
    expect(img.info.backing).toEqual({ filename: 'base image.raw', format: 'raw' });
  });
});
