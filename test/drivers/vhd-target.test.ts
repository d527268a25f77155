/**
 * VHD (vpc) as a conversion target, dynamic and fixed: plan/build on synthetic mappings read back
 * with the VHD reader; the size rule against QEMU's; the real engine on images qemu-img made from
 * every source format, judged by qemu-img (compare, info, check) and by QEMU writing into the result;
 * refusals before any write.
 */
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { vhdDriver } from '../../drivers/vhd/index.js';
import { BAT_UNUSED, decodeFooter } from '../../drivers/vhd/format.js';
import { VHD_MAX_GEOMETRY, geometrySectors, qemuCreateSize, virtualSectors } from '../../drivers/vhd/geometry.js';
import { BITMAP_SIZE, BLOCK_SIZE, HEAD_BYTES, MAX_VIRTUAL_SIZE, parseVhdOptions, sizeFieldsFor, vhdTarget } from '../../drivers/vhd/target.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import type { ImageInfo, PlanInput, TargetBuild, TargetPlan } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import { convertInPlace, overlayMoves, planConversion, ConversionFailedError, type DataMove } from '../../src/engine/convert.js';
import { guestEquivalent } from '../../src/engine/mapping.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace, type FreeRange } from '../../src/host-space.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';
import { convertAndJudge, readVhdFile } from './vhd-target-support.js';

const haveQemu = qemuAvailable();
const MiB = 1 << 20;

const syntheticInfo = (vsize: number, extra: Partial<ImageInfo> = {}): ImageInfo => ({ format: 'synthetic', virtualSize: vsize, dirty: false, corrupt: false, features: [], details: {}, ...extra });

// ---------------------------------------------------------------------------------------------------
// Options and the size rule.

describe('vhd target: options', () => {
  it('subformat dynamic (default) or fixed, force_size on/off', () => {
    expect(parseVhdOptions({})).toEqual({ subformat: 'dynamic', forceSize: false });
    expect(parseVhdOptions({ subformat: 'fixed', force_size: 'on' })).toEqual({ subformat: 'fixed', forceSize: true });
    expect(parseVhdOptions({ subformat: 'dynamic', force_size: 'off' })).toEqual({ subformat: 'dynamic', forceSize: false });
  });

  it.each([
    [{ subformat: 'differencing' }, 'subformat'],
    [{ force_size: 'maybe' }, 'force_size'],
    [{ block_size: '1M' }, 'block_size'],
    [{ backing_file: 'a.vhd' }, 'backing_file'],
    [{ bogus: '1' }, 'bogus'],
  ])('%o is refused, naming %s', (options, name) => {
    expect(() => parseVhdOptions(options)).toThrow(UsageError);
    expect(() => parseVhdOptions(options)).toThrow(name);
  });

  it('file holes are zeros for a dynamic disk (not copied), guest bytes in place for a fixed one', () => {
    expect(vhdTarget.holesAsData!({})).toBe(false);
    expect(vhdTarget.holesAsData!({ subformat: 'fixed' })).toBe(true);
  });
});

describe('vhd target: the size rule', () => {
  propTest.prop([fc.integer({ min: 0, max: MAX_VIRTUAL_SIZE / 512 }), fc.boolean()], { numRuns: 500 })('QEMU computes exactly the size from what is written', (sectors, force) => {
    const f = sizeFieldsFor(sectors * 512, force);
    expect(virtualSectors(f.creatorApp, f.geometry, BigInt(sectors * 512))).toBe(BigInt(sectors));
    if (force) expect(f.creatorApp).toBe('qem2');
  });

  propTest.prop([fc.integer({ min: 1, max: 200 * 1024 * MiB })], { numRuns: 300 })('a size qemu-img create makes gets what qemu-img create writes', (requested) => {
    const q = qemuCreateSize(requested);
    const f = sizeFieldsFor(q.virtualSize, false);
    if (geometrySectors(q.geometry) === VHD_MAX_GEOMETRY) {
      // Beyond the CHS range QEMU keeps the size in current_size under the maximum geometry.
      expect(f.geometry).toEqual(q.geometry);
    } else {
      expect(f).toEqual({ geometry: q.geometry, creatorApp: 'qemu' });
    }
  });

  it('sizes CHS cannot express exactly: "qem2" with the maximum geometry, as force_size=on', () => {
    expect(sizeFieldsFor(64 * MiB, false)).toEqual({ creatorApp: 'qem2', geometry: { cylinders: 65535, heads: 16, sectorsPerTrack: 255 } });
    expect(sizeFieldsFor(qemuCreateSize(64 * MiB).virtualSize, true).creatorApp).toBe('qem2');
  });

  it('refuses a size that is not a multiple of 512, or above 2040 GiB, naming it', () => {
    expect(() => sizeFieldsFor(1000, false)).toThrow(/1000 bytes is not a multiple of 512/);
    expect(() => sizeFieldsFor(MAX_VIRTUAL_SIZE + 512, false)).toThrow(new RegExp(`${MAX_VIRTUAL_SIZE + 512} bytes is above .*2040 GiB`));
    expect(() => sizeFieldsFor(MAX_VIRTUAL_SIZE, false)).not.toThrow();
  });
});

// ---------------------------------------------------------------------------------------------------
// plan() and build() on synthetic mappings, through the engine's allocator and move overlay, read
// back with the VHD reader.

interface Synthetic {
  blocks: number;
  tailSectors: number;
  segments: { kind: 'data' | 'zero' | 'unallocated'; size: 'sector' | 'block' | 'blocks' | 'odd' }[];
  hostOrder: number[];
  /** Free sectors before each data segment (0: no room for a bitmap). */
  gaps: number[];
  misalign: number;
  extraTail: number;
}

const SECTORS_PER_BLOCK = BLOCK_SIZE / 512;

const syntheticArb: fc.Arbitrary<Synthetic> = fc.record({
  blocks: fc.integer({ min: 1, max: 8 }),
  tailSectors: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: SECTORS_PER_BLOCK - 1 })),
  segments: fc.array(
    fc.record({ kind: fc.constantFrom('data' as const, 'data' as const, 'zero' as const, 'unallocated' as const), size: fc.constantFrom('sector' as const, 'block' as const, 'blocks' as const, 'odd' as const) }),
    { minLength: 1, maxLength: 10 },
  ),
  hostOrder: fc.array(fc.nat(1000), { minLength: 10, maxLength: 10 }),
  gaps: fc.array(fc.constantFrom(0, 0, 1, 1, 2, 300), { minLength: 10, maxLength: 10 }),
  misalign: fc.constantFrom(0, 0, 0, 0, 100),
  extraTail: fc.constantFrom(0, 0, 1, 5000),
});

/** A mapping over [0, vsize) and a source host space with free gaps of the given sizes before data. */
function synthesize(s: Synthetic): { map: ExtentMap; hs: HostSpace; fileSize: number } {
  const vsize = s.blocks * BLOCK_SIZE - s.tailSectors * 512;
  const lengthOf = (size: Synthetic['segments'][number]['size']) =>
    size === 'sector' ? 512 : size === 'block' ? BLOCK_SIZE : size === 'blocks' ? 3 * BLOCK_SIZE : BLOCK_SIZE / 2 + 3 * 512;
  const segs: { kind: Synthetic['segments'][number]['kind']; guest: number; length: number }[] = [];
  let g = 0;
  for (const x of s.segments) {
    if (g >= vsize) break;
    const length = Math.min(lengthOf(x.size), vsize - g);
    segs.push({ kind: x.kind, guest: g, length });
    g += length;
  }
  if (g < vsize) segs.push({ kind: 'unallocated', guest: g, length: vsize - g });
  const dataIdx = segs.map((x, i) => (x.kind === 'data' ? i : -1)).filter((i) => i >= 0);
  const order = dataIdx.slice().sort((a, b) => s.hostOrder[a % 10]! - s.hostOrder[b % 10]! || a - b);
  const hostOf = new Map<number, number>();
  let next = 512; // the old header
  order.forEach((i, k) => {
    next += s.gaps[k % 10]! * 512;
    hostOf.set(i, next + (k === 1 ? s.misalign : 0));
    next += segs[i]!.length + (k === 1 ? s.misalign : 0);
  });
  const map = new ExtentMap(vsize);
  for (const [i, x] of segs.entries()) map.push({ guest: x.guest, length: x.length, kind: x.kind, ...(x.kind === 'data' ? { host: hostOf.get(i)! } : {}) });
  const fileSize = alignUp512(next) + s.extraTail * 512;
  const hs = new HostSpace('synthetic', fileSize);
  hs.add(0, 512, 'header', 'old header');
  for (const e of map) if (e.kind === 'data') hs.add(e.host!, e.length, 'data', 'data');
  hs.finish();
  return { map, hs, fileSize };
}

function alignUp512(n: number): number {
  return Math.ceil(n / 512) * 512;
}

/** What the engine does before build: moves allocated (prefix and whole host blocks), then build. */
function engineBuild(input: PlanInput): { plan: TargetPlan; moves: DataMove[]; moved: ExtentMap; build: TargetBuild } {
  const plan = vhdTarget.plan(input);
  const reserved = [...plan.fixedRegions, ...(plan.reserved ?? [])].map((r) => ({ start: r.start, length: r.length })).sort((a, b) => a.start - b.start);
  const alloc = new GapAllocator(input.hostSpace.free(), reserved, Math.max(input.fileSize, input.hostSpace.usedEnd()));
  const prefix = plan.movePrefix ?? 0;
  const moves: DataMove[] = plan.mustMove.map((m) => ({
    guest: m.guest,
    length: m.length,
    to: alloc.alloc(prefix + Math.max(m.length, m.hostLength ?? 0), plan.dataAlignment) + prefix,
    reason: m.reason,
  }));
  const moved = overlayMoves(input.mapping, moves);
  const build = vhdTarget.build(plan, { ...input, mapping: moved }, alloc);
  return { plan, moves, moved, build };
}

async function openBuilt(build: TargetBuild) {
  const dev = new MemoryBlockDevice('synthetic.vhd');
  await dev.write(new Uint8Array(1), build.finalLength - 1);
  for (const w of [...build.writes, ...build.fixed]) await dev.write(w.bytes, w.offset);
  expect(await dev.size()).toBe(build.finalLength);
  return vhdDriver.open(dev, { path: 'synthetic.vhd', openRelated: () => Promise.reject(new Error('no related files')) });
}

/** Whether a range lies in the source's free space or past everything the source uses. */
function inside(r: { start: number; length: number }, free: FreeRange[], sourceEnd: number): boolean {
  const spaces = [...free, { start: sourceEnd, length: Infinity }];
  // A free range reaching the end of the source continues past it.
  return spaces.some((f) => r.start >= f.start && r.start + r.length <= (f.start + f.length >= sourceEnd ? Infinity : f.start + f.length));
}

describe('vhd target: dynamic plan/build on synthetic mappings', () => {
  propTest.prop([syntheticArb], { numRuns: 120 })('reads back as the same guest mapping; kept data stays; writes only where the source has nothing', async (s) => {
    const { map, hs, fileSize } = synthesize(s);
    const input: PlanInput = { info: syntheticInfo(map.virtualSize), mapping: map, hostSpace: hs, fileSize, options: {} };
    const { plan, moves, moved, build } = engineBuild(input);
    expect(build.metadataBytes).toBe(plan.metadataBytes);
    // Footer copy and header; then the bitmaps written at the commit point, each over the last sector
    // of data that moves (free once the commit points the BAT at the copy), never over data that stays.
    expect(plan.fixedRegions.slice(0, 2).map((r) => [r.start, r.length])).toEqual([[0, 512], [512, 1024]]);
    const commitBitmaps = plan.fixedRegions.slice(2);
    const movingData = (at: number) =>
      plan.mustMove.some((m) => [...map.range(m.guest, m.length)].some((e) => e.kind === 'data' && e.host! <= at && at + 512 <= e.host! + e.length));
    for (const b of commitBitmaps) {
      expect(b.length).toBe(512);
      expect(movingData(b.start), `commit bitmap at ${b.start} lies in data that moves`).toBe(true);
    }

    // Every block holding data is kept or moved whole; blocks of zeros are neither.
    const dataBlocks = new Set<number>();
    for (const e of map) if (e.kind === 'data') for (let b = Math.floor(e.guest / BLOCK_SIZE); b * BLOCK_SIZE < e.guest + e.length; b++) dataBlocks.add(b);
    for (const m of plan.mustMove) {
      expect(m.guest % BLOCK_SIZE).toBe(0);
      expect(m.length).toBe(Math.min(BLOCK_SIZE, map.virtualSize - m.guest));
      expect(dataBlocks.has(m.guest / BLOCK_SIZE)).toBe(true);
    }

    // Pre-commit writes and reserved ranges touch only space the source does not use.
    const free = hs.free();
    const sourceEnd = Math.max(fileSize, hs.usedEnd());
    for (const w of build.writes) expect(inside({ start: w.offset, length: w.bytes.length }, free, sourceEnd), `write at ${w.offset}`).toBe(true);
    for (const r of plan.reserved ?? []) expect(inside(r, free, sourceEnd), `reserved ${r.start}`).toBe(true);
    // The fixed regions: footer copy, header, trailing footer past everything.
    expect(build.fixed.map((f) => [f.offset, f.bytes.length])).toEqual([[0, 512], [512, 1024], [build.finalLength - 512, 512], ...commitBitmaps.map((b) => [b.start, 512])]);
    for (const w of build.writes) expect(w.offset + w.bytes.length).toBeLessThanOrEqual(build.finalLength - 512);

    const img = await openBuilt(build);
    expect(img.info.virtualSize).toBe(map.virtualSize);
    expect(img.info.subformat).toBe('dynamic');
    expect(img.info.details['allocated-blocks']).toBe(dataBlocks.size);
    expect(guestEquivalent(moved, await img.mapping(), false)).toBeNull();
    const report = await img.check();
    expect(report.corruptions + report.checkErrors, report.messages.join('\n')).toBe(0);
    // Data that did not have to move stays where it was (its block points at it).
    const movedGuest = (g: number) => moves.some((m) => g >= m.guest && g < m.guest + m.length);
    for (const e of map) {
      if (e.kind !== 'data') continue;
      for (const r of (await img.mapping()).range(e.guest, e.length)) if (!movedGuest(r.guest)) expect(r.host).toBe(e.host! + (r.guest - e.guest));
    }
    // A moved partial last block still owns a whole block on the host: nothing else starts in it.
    const last = moves.find((m) => m.length < BLOCK_SIZE);
    if (last) for (const w of build.writes) expect(w.offset >= last.to + BLOCK_SIZE || w.offset + w.bytes.length <= last.to, `write at ${w.offset} inside the last block`).toBe(true);
  });

  const one = (vsize: number, runs: { length: number; kind: 'data' | 'zero' | 'unallocated'; host?: number }[], free: FreeRange[], fileSize: number): PlanInput => {
    const m = new ExtentMap(vsize);
    let g = 0;
    for (const r of runs) {
      m.push({ guest: g, ...r });
      g += r.length;
    }
    const hs = new HostSpace('synthetic', fileSize);
    let pos = 0;
    for (const f of [...free, { start: fileSize, length: 0 }]) {
      hs.add(pos, f.start - pos, 'data', 'used');
      pos = f.start + f.length;
    }
    hs.finish();
    return { info: syntheticInfo(vsize), mapping: m, hostSpace: hs, fileSize, options: {} };
  };

  it('a whole block of data with a free sector before it stays; the bitmap goes there', async () => {
    const host = 3 * MiB;
    const input = one(4 * MiB, [{ length: 2 * MiB, kind: 'unallocated' }, { length: 2 * MiB, kind: 'data', host }], [{ start: host - 512, length: 512 }], 8 * MiB);
    const { plan, build, moves } = engineBuild(input);
    expect(plan.mustMove).toEqual([]);
    expect(moves).toEqual([]);
    expect(plan.reserved).toEqual([{ start: host - 512, length: 512 }]);
    expect(build.writes.find((w) => w.offset === host - 512)!.bytes).toEqual(new Uint8Array(512).fill(0xff));
    const img = await openBuilt(build);
    expect([...(await img.mapping())]).toEqual([
      { guest: 0, length: 2 * MiB, kind: 'zero' },
      { guest: 2 * MiB, length: 2 * MiB, kind: 'data', host },
    ]);
  });

  it('without the free sector, under the header, or split on the host, the block moves whole', () => {
    const used = one(2 * MiB, [{ length: 2 * MiB, kind: 'data', host: 3 * MiB }], [], 8 * MiB);
    expect(vhdTarget.plan(used).mustMove).toEqual([{ guest: 0, length: 2 * MiB, reason: expect.stringContaining('for its bitmap') }]);
    const head = one(2 * MiB, [{ length: 2 * MiB, kind: 'data', host: 1536 }], [{ start: 1024, length: 512 }], 8 * MiB);
    expect(vhdTarget.plan(head).mustMove).toEqual([{ guest: 0, length: 2 * MiB, reason: expect.stringContaining('header') }]);
    const split = one(2 * MiB, [{ length: MiB, kind: 'data', host: 3 * MiB }, { length: MiB, kind: 'data', host: 5 * MiB }], [{ start: 3 * MiB - 512, length: 512 }], 8 * MiB);
    expect(vhdTarget.plan(split).mustMove).toEqual([{ guest: 0, length: 2 * MiB, reason: expect.stringContaining('not contiguous') }]);
    const mixed = one(2 * MiB, [{ length: MiB, kind: 'data', host: 3 * MiB }, { length: MiB, kind: 'zero' }], [{ start: 3 * MiB - 512, length: 512 }], 8 * MiB);
    expect(vhdTarget.plan(mixed).mustMove).toHaveLength(1);
    const misaligned = one(2 * MiB, [{ length: 2 * MiB, kind: 'data', host: 3 * MiB + 100 }], [{ start: 3 * MiB - 412, length: 512 }], 8 * MiB);
    expect(vhdTarget.plan(misaligned).mustMove).toEqual([{ guest: 0, length: 2 * MiB, reason: expect.stringContaining('aligned') }]);
  });

  it('a partial last block stays only when the rest of its host block is free too', () => {
    const vsize = 2 * MiB + 4096;
    const host = 3 * MiB;
    const runs = [{ length: 2 * MiB, kind: 'unallocated' as const }, { length: 4096, kind: 'data' as const, host }];
    const fits = one(vsize, runs, [{ start: host - 512, length: 512 }, { start: host + 4096, length: 8 * MiB - host - 4096 }], 8 * MiB);
    const p = vhdTarget.plan(fits);
    expect(p.mustMove).toEqual([]);
    expect(p.reserved).toEqual([{ start: host - 512, length: 512 }, { start: host + 4096, length: 2 * MiB - 4096 }]);
    const tight = one(vsize, runs, [{ start: host - 512, length: 512 }, { start: host + 4096, length: MiB }], 8 * MiB);
    expect(vhdTarget.plan(tight).mustMove).toEqual([{ guest: 2 * MiB, length: 4096, hostLength: 2 * MiB, reason: expect.stringContaining('partial last block') }]);
  });

  it('refuses a layout whose blocks would lie beyond 2 TiB (32-bit BAT sector numbers), naming subformat=fixed', () => {
    const fileSize = 2 ** 41;
    const input = one(2 * MiB, [{ length: 2 * MiB, kind: 'data', host: fileSize - 2 * MiB }], [], fileSize);
    expect(() => engineBuild(input)).toThrow(UnsupportedError);
    expect(() => engineBuild(input)).toThrow(/beyond the 2 TiB.*subformat=fixed/);
  });

  it('an empty disk: a BAT of unallocated entries and nothing else', async () => {
    const input = one(10 * MiB, [{ length: 10 * MiB, kind: 'unallocated' }], [{ start: 512, length: MiB - 512 }], MiB);
    const { build } = engineBuild(input);
    expect(build.metadataBytes).toBe(HEAD_BYTES + 512 + 512);
    const bat = build.writes.find((w) => w.bytes.length === 512 && w.offset < MiB)!;
    expect(bat.bytes).toEqual(new Uint8Array(512).fill(0xff));
    const img = await openBuilt(build);
    expect([...(await img.mapping())]).toEqual([{ guest: 0, length: 10 * MiB, kind: 'zero' }]);
  });

  it('a disk of size 0', async () => {
    const input = one(0, [], [], 4096);
    const { build } = engineBuild(input);
    const img = await openBuilt(build);
    expect(img.info.virtualSize).toBe(0);
    expect((await img.check()).corruptions).toBe(0);
  });

  it('refuses a source with a backing file, naming the alternatives', () => {
    const input = one(2 * MiB, [{ length: 2 * MiB, kind: 'unallocated' }], [], 4096);
    input.info = syntheticInfo(2 * MiB, { backing: { filename: 'base.qcow2', format: 'qcow2' } });
    expect(() => vhdTarget.plan(input)).toThrow(UnsupportedError);
    expect(() => vhdTarget.plan(input)).toThrow(/qemu-img rebase -b "".*qcow2 or QED/);
  });

  it('refuses a size that is not a multiple of 512, naming it', () => {
    const input = one(2 * MiB, [{ length: 2 * MiB, kind: 'unallocated' }], [], 4096);
    input.info = syntheticInfo(1000);
    input.mapping = new ExtentMap(1000);
    input.mapping.push({ guest: 0, length: 1000, kind: 'zero' });
    expect(() => vhdTarget.plan(input)).toThrow(/1000 bytes is not a multiple of 512/);
  });
});

describe('vhd target: fixed plan/build', () => {
  it('identity placement, the footer at the virtual size, nothing else written', async () => {
    const vsize = 5 * MiB + 1536;
    const map = new ExtentMap(vsize);
    map.push({ guest: 0, length: vsize, kind: 'data', host: 0 });
    const hs = new HostSpace('raw', vsize);
    hs.add(0, vsize, 'data', 'data');
    hs.finish();
    const input: PlanInput = { info: syntheticInfo(vsize), mapping: map, hostSpace: hs, fileSize: vsize, options: { subformat: 'fixed' } };
    const plan = vhdTarget.plan(input);
    expect(plan).toMatchObject({ placement: 'identity', mustMove: [], fixedRegions: [{ start: vsize, length: 512 }], metadataBytes: 512 });
    const build = vhdTarget.build(plan, input, new GapAllocator(hs.free(), plan.fixedRegions, vsize));
    expect(build).toMatchObject({ writes: [], finalLength: vsize + 512, metadataBytes: 512 });
    expect(build.fixed.map((f) => f.offset)).toEqual([vsize]);
    const f = decodeFooter(build.fixed[0]!.bytes);
    expect(f).toMatchObject({ diskType: 2, dataOffset: 0xffffffffffffffffn, currentSize: BigInt(vsize), creatorApp: plan.parameters.creator_app });
    const img = await openBuilt(build);
    expect(img.info).toMatchObject({ virtualSize: vsize, subformat: 'fixed' });
    expect(guestEquivalent(map, await img.mapping(), false)).toBeNull();
  });
});

// ---------------------------------------------------------------------------------------------------
// Real conversions, judged by qemu-img.

const writes = ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -P 0x33 40M 64k', 'write -P 0x44 63M 1M'];
/** Blocks 0, 1, 20 and 31 hold data: 8 MiB moves where no block can stay. */
const MOVED_4_BLOCKS = 4 * BLOCK_SIZE;
const qemuMade = (format: string, opts: string[] = [], size = '64M', more: string[] = []) => (p: string) => {
  qemuImg(['create', '-q', '-f', format, ...(opts.length ? ['-o', opts.join(',')] : []), p, size]);
  // The fixed writes fit in any size from 16 MiB on (the last one at the end of the disk).
  const sized = size === '64M' ? writes : [...writes.slice(0, 2), `write -P 0x44 ${parseInt(size) - 1}M 1M`];
  qemuIo(p, format, [...sized, ...more]);
};

interface Source {
  name: string;
  format: string;
  create: (path: string) => void;
  /** Bytes of data that move before the commit. */
  moves: number;
  options?: Record<string, string>;
  check?: (j: Awaited<ReturnType<typeof convertAndJudge>>, file: string) => void;
}

const sources: Source[] = [
  // Data clusters lie back to back (or after tables) in every format QEMU writes: no block has a
  // free sector before it, so each block holding data is copied whole.
  { name: 'qcow2 64k (default)', format: 'qcow2', create: qemuMade('qcow2'), moves: MOVED_4_BLOCKS },
  { name: 'qcow2 512 B clusters', format: 'qcow2', create: qemuMade('qcow2', ['cluster_size=512']), moves: MOVED_4_BLOCKS },
  // 2 MiB clusters written in guest order lie back to back: every other block stays, its bitmap written
  // at the commit over the last sector of the moved block before it.
  { name: 'qcow2 2 MiB clusters', format: 'qcow2', create: qemuMade('qcow2', ['cluster_size=2M']), moves: MOVED_4_BLOCKS / 2 },
  {
    name: 'qcow2 zero clusters: a block of only zeros stays unallocated',
    format: 'qcow2',
    create: qemuMade('qcow2', [], '64M', ['write -P 0x55 10M 2M', 'write -z 10M 2M', 'write -z 30M 64k']),
    moves: MOVED_4_BLOCKS,
    check: (j) => expect(j.file.bat![5]).toBe(BAT_UNUSED),
  },
  {
    name: 'qcow2 compressed',
    format: 'qcow2',
    create: (p) => {
      qemuImg(['create', '-q', '-f', 'raw', `${p}.raw`, '16M']);
      qemuIo(`${p}.raw`, 'raw', ['write -P 0x77 0 3M', 'write -P 0x78 9M 1M']);
      qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', `${p}.raw`, p]);
    },
    moves: 3 * BLOCK_SIZE,
  },
  // QED and VMDK sparse relocate the moved blocks inside the source (repointing their own tables): only
  // the 64 KiB clusters/grains holding data move — 100k → 2, 1M + 1M → 32, 64k → 1: 35 of them.
  { name: 'QED', format: 'qed', create: qemuMade('qed'), moves: 35 * 64 * 1024 },
  { name: 'VMDK monolithicSparse', format: 'vmdk', create: qemuMade('vmdk'), moves: 35 * 64 * 1024 },
  {
    name: 'VMDK streamOptimized',
    format: 'vmdk',
    create: (p) => {
      qemuMade('raw')(`${p}.raw`);
      qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', `${p}.raw`, p]);
    },
    moves: MOVED_4_BLOCKS,
  },
  // Raw: every byte is data where it lies, so no sector is free for a bitmap; the holes are zeros,
  // not copied: only the four blocks holding data move.
  { name: 'raw sparse', format: 'raw', create: qemuMade('raw'), moves: MOVED_4_BLOCKS },
  {
    // No free sector anywhere: block 0 moves (its bitmap would be in the header), block 1 stays with its
    // bitmap over block 0's old last sector, block 2 moves, … — half the data moves, and the disk usage
    // stays the source's plus the metadata (the moved blocks' old places are punched).
    name: 'raw dense: every other block moves',
    format: 'raw',
    create: (p) => {
      qemuImg(['create', '-q', '-f', 'raw', p, '16M']);
      qemuIo(p, 'raw', ['write -P 0x5a 0 16M', 'write -P 0x11 100k 7k']);
    },
    moves: 8 * MiB,
    check: (j, f) => {
      expect(j.report.moves.map((m) => m.guest / BLOCK_SIZE)).toEqual([0, 2, 4, 6]);
      for (const b of [1, 3, 5, 7]) expect(j.file.bat![b]! * 512 + 512).toBe(b * BLOCK_SIZE);
      expect(statSync(f).blocks * 512).toBeLessThanOrEqual(16 * MiB + 64 * 1024);
    },
  },
];

describe.runIf(haveQemu)('vhd target: dynamic conversions judged by qemu-img', () => {
  for (const s of sources) {
    it(s.name, async () => {
      const t = withTmpDir();
      try {
        const f = t.path('disk.img');
        s.create(f);
        const j = await convertAndJudge(f, s.format, s.options);
        expect(j.report.written.dataBytes).toBe(s.moves);
        expect(j.report.moves.every((m) => m.length === BLOCK_SIZE && m.guest % BLOCK_SIZE === 0)).toBe(true);
        expect(j.ours.info.subformat).toBe('dynamic');
        expect(j.file.footer.diskType).toBe(3);
        expect(j.file.header!.maxTableEntries).toBe(Math.ceil((j.info['virtual-size'] as number) / BLOCK_SIZE));
        s.check?.(j, f);
      } finally {
        t.cleanup();
      }
    });
  }

  it('QEMU writes into the converted image (new blocks, moved blocks, a block it must allocate past the old data) and reads back', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('disk.qcow2');
      qemuMade('qcow2')(f);
      await convertAndJudge(f, 'qcow2');
      const copy = `${f}.orig`;
      const more = ['write -P 0xa1 0 4k', 'write -P 0xa2 2M 8k', 'write -P 0xa3 10M 3M', 'write -P 0xa4 63M 4k', 'write -z 40M 64k'];
      qemuIo(f, 'vpc', more.slice(0, 2));
      qemuIo(f, 'vpc', more.slice(2));
      qemuIo(copy, 'qcow2', more);
      const cmp = qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vpc', copy, f]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      // Our reader still reads it cleanly after QEMU appended blocks and rewrote its footer.
      const chain = await (await import('../../src/image.js')).openImage(f, { drivers: allDrivers, format: 'vhd', backing: false });
      try {
        const r = await chain.layers[0]!.check();
        expect(r.corruptions + r.checkErrors, r.messages.join('\n')).toBe(0);
        expect(chain.layers[0]!.info.details['allocated-blocks']).toBe(6);
      } finally {
        await chain.close();
      }
    } finally {
      t.cleanup();
    }
  });

  it('odd size 33 MiB + 512 (a partial last block): exact size under QEMU, "qem2"; QEMU writes into the partial block', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('odd.qcow2');
      const size = 33 * MiB + 512;
      qemuImg(['create', '-q', '-f', 'qcow2', f, String(size)]);
      qemuIo(f, 'qcow2', ['write -P 0x11 0 64k', `write -P 0x22 ${32 * MiB} ${MiB + 512}`]);
      const j = await convertAndJudge(f, 'qcow2');
      expect(j.info['virtual-size']).toBe(size);
      expect(j.ours.info.virtualSize).toBe(size);
      expect(j.report.target.parameters).toMatchObject({ creator_app: 'qem2', geometry: '65535/16/255' });
      // The partial last block (guest 32 MiB..33 MiB + 512) moved and owns a whole host block.
      const last = j.report.moves.find((m) => m.guest === 32 * MiB)!;
      expect(last.length).toBe(MiB + 512);
      expect(j.report.finalLength).toBeGreaterThanOrEqual(last.to + BLOCK_SIZE + 512);
      qemuIo(f, 'vpc', [`write -P 0x33 ${33 * MiB} 512`, 'write -P 0x44 20M 4k']);
      qemuIo(`${f}.orig`, 'qcow2', [`write -P 0x33 ${33 * MiB} 512`, 'write -P 0x44 20M 4k']);
      expect(qemuImgStatus(['compare', '-f', 'qcow2', '-F', 'vpc', `${f}.orig`, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  it('odd size 1 GiB + 1536 from a sparse raw file, and a CHS-exact size gets creator "qemu" as qemu-img create writes', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('odd.raw');
      const size = 1024 * MiB + 3 * 512;
      qemuImg(['create', '-q', '-f', 'raw', f, String(size)]);
      qemuIo(f, 'raw', ['write -P 0x11 512 4k', `write -P 0x22 ${size - 1024} 1024`]);
      const j = await convertAndJudge(f, 'raw');
      expect(j.info['virtual-size']).toBe(size);
      expect(j.report.written.dataBytes).toBe(BLOCK_SIZE + 1536);

      const g = t.path('chs.qcow2');
      const chsSize = qemuCreateSize(64 * MiB).virtualSize;
      qemuImg(['create', '-q', '-f', 'qcow2', g, String(chsSize)]);
      qemuIo(g, 'qcow2', ['write -P 0x11 1M 64k']);
      const k = await convertAndJudge(g, 'qcow2');
      expect(k.info['virtual-size']).toBe(chsSize);
      expect(k.report.target.parameters.creator_app).toBe('qemu');
      expect(k.ours.info.details['size-source']).toBe('chs');
      // What qemu-img create writes for that size, field for field.
      const q = t.path('q.vhd');
      qemuImg(['create', '-q', '-f', 'vpc', q, String(chsSize)]);
      const theirs = readVhdFile(q).footer;
      expect(k.file.footer).toMatchObject({ creatorApp: theirs.creatorApp, geometry: theirs.geometry, currentSize: theirs.currentSize, originalSize: theirs.originalSize, creatorOs: theirs.creatorOs, creatorVersion: theirs.creatorVersion, features: theirs.features });
      // force_size=on: current_size under the maximum geometry, as qemu-img create -o force_size=on.
      const h = t.path('force.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', h, String(chsSize)]);
      const fz = await convertAndJudge(h, 'qcow2', { force_size: 'on' });
      expect(fz.report.target.parameters).toMatchObject({ creator_app: 'qem2', geometry: '65535/16/255' });
    } finally {
      t.cleanup();
    }
  });

  it('round trip vpc → qcow2 → vpc: the way back keeps every block in place (the old bitmap sectors are free), a partial last block included', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('r.img');
      // 33 MiB asks qemu-img for a CHS size whose last block is partial.
      qemuImg(['create', '-q', '-f', 'vpc', f, '33M']);
      const vsize = JSON.parse(qemuImg(['info', '--output=json', f]))['virtual-size'] as number;
      expect(vsize % BLOCK_SIZE).not.toBe(0);
      const lastGuest = Math.floor(vsize / BLOCK_SIZE) * BLOCK_SIZE;
      qemuIo(f, 'vpc', ['write -P 0x11 0 64k', 'write -P 0x22 5M 1M', `write -P 0x33 ${lastGuest} ${vsize - lastGuest}`]);
      const orig = t.path('orig.vhd');
      copyFileSync(f, orig);
      const there = await convertInPlace(f, { to: 'qcow2', drivers: allDrivers, options: { cluster_size: '512' } });
      expect(there.written.dataBytes).toBe(0);
      const back = await convertAndJudge(f, 'qcow2');
      expect(back.report.written.dataBytes).toBe(0);
      expect(back.report.moves).toEqual([]);
      expect(back.ours.info.details['allocated-blocks']).toBe(3);
      expect(qemuImgStatus(['compare', '-f', 'vpc', '-F', 'vpc', orig, f]).status).toBe(0);
      // Block data where QEMU first put it: the BAT entries are the original ones.
      expect(back.file.bat).toEqual(readVhdFile(orig).bat);
    } finally {
      t.cleanup();
    }
  });
});

describe.runIf(haveQemu)('vhd target: fixed', () => {
  it('raw → VHD fixed: zero copy, the footer appended, not one data byte changed', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('disk.raw');
      const size = 24 * MiB + 3 * 512;
      qemuImg(['create', '-q', '-f', 'raw', f, String(size)]);
      qemuIo(f, 'raw', ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', `write -P 0x44 ${size - 4096} 4096`]);
      const sha = createHash('sha256').update(readFileSync(f)).digest('hex');
      const allocatedBefore = statSync(f).blocks;
      const j = await convertAndJudge(f, 'raw', { subformat: 'fixed' });
      expect(j.report.written.dataBytes).toBe(0);
      expect(j.report.metadataBytes).toBe(512);
      expect(j.report.finalLength).toBe(size + 512);
      expect(j.ours.info.subformat).toBe('fixed');
      expect(j.file.eofFooter).toMatchObject({ diskType: 2, currentSize: BigInt(size), dataOffset: 0xffffffffffffffffn });
      const bytes = readFileSync(f);
      expect(createHash('sha256').update(bytes.subarray(0, size)).digest('hex')).toBe(sha);
      // Still sparse: the holes stayed holes (at most the footer's block more).
      expect(statSync(f).blocks).toBeLessThanOrEqual(allocatedBefore + 8);
      // qemu-img probes a fixed VHD as raw; with -f vpc it is the disk, and QEMU writes through it.
      qemuIo(f, 'vpc', ['write -P 0x66 8M 4k']);
      qemuIo(`${f}.orig`, 'raw', ['write -P 0x66 8M 4k']);
      expect(qemuImgStatus(['compare', '-f', 'raw', '-F', 'vpc', `${f}.orig`, f]).status).toBe(0);
    } finally {
      t.cleanup();
    }
  });

  // Other sources need their data relocated to its guest offsets first: the engine's relocation
  // (src/engine/relocate.ts, built alongside) does it for the sources whose drivers expose their
  // pointers, and refuses the others before any write. Either way: identical content or an untouched file.
  for (const format of ['qed', 'vmdk', 'qcow2']) {
    it(`${format} → VHD fixed: relocated to identity and judged, or refused byte-identical`, async () => {
      const t = withTmpDir();
      try {
        const f = t.path(`a.${format}`);
        qemuMade(format, [], '16M')(f);
        const before = readFileSync(f);
        const plan = await planConversion(f, { to: 'vhd', drivers: allDrivers, options: { subformat: 'fixed' } }).catch((e: unknown) => e);
        if (plan instanceof Error) {
          expect(plan).toBeInstanceOf(UnsupportedError);
          const err = await convertInPlace(f, { to: 'vhd', drivers: allDrivers, options: { subformat: 'fixed' } }).catch((e: unknown) => e);
          expect(err).toBeInstanceOf(UnsupportedError);
          expect(readFileSync(f).equals(before)).toBe(true);
          return;
        }
        const j = await convertAndJudge(f, format, { subformat: 'fixed' });
        expect(j.ours.info.subformat).toBe('fixed');
        expect(j.report.finalLength).toBe(16 * MiB + 512);
        expect(j.file.eofFooter.diskType).toBe(2);
      } finally {
        t.cleanup();
      }
    });
  }
});

describe.runIf(haveQemu)('vhd target: refusals leave the file byte-identical', () => {
  const refused = async (f: string, options: Record<string, string>, type: new (...a: never[]) => Error, ...words: (string | RegExp)[]) => {
    const before = readFileSync(f);
    const err = await convertInPlace(f, { to: 'vhd', drivers: allDrivers, options }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(type);
    expect(err).not.toBeInstanceOf(ConversionFailedError);
    for (const w of words) expect((err as Error).message).toMatch(w);
    expect(readFileSync(f).equals(before)).toBe(true);
    const plan = await planConversion(f, { to: 'vhd', drivers: allDrivers, options }).catch((e: unknown) => e);
    expect(plan).toBeInstanceOf(type);
  };

  it.each([
    [{ subformat: 'bogus' }, 'subformat'],
    [{ force_size: 'maybe' }, 'force_size'],
    [{ block_size: '1M' }, 'block_size'],
    [{ bogus: '1' }, 'bogus'],
  ])('%o → UsageError naming %s', async (options, name) => {
    const t = withTmpDir();
    try {
      const f = t.path('a.qcow2');
      qemuMade('qcow2')(f);
      await refused(f, options, UsageError, name);
    } finally {
      t.cleanup();
    }
  });

  it('a backing file: refused, naming qemu-img rebase and qcow2/QED', async () => {
    const t = withTmpDir();
    try {
      const base = t.path('base.raw');
      qemuImg(['create', '-q', '-f', 'raw', base, '8M']);
      const f = t.path('child.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', f]);
      qemuIo(f, 'qcow2', ['write -P 0xab 1M 64k']);
      await refused(f, {}, UnsupportedError, 'qemu-img rebase -b ""', 'qcow2 or QED', 'base.raw');
    } finally {
      t.cleanup();
    }
  });

  it('a disk above 2040 GiB: refused, naming the size', async () => {
    const t = withTmpDir();
    try {
      const f = t.path('big.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', f, '2041G']);
      await refused(f, {}, UnsupportedError, String(2041 * 1024 * MiB), '2040 GiB');
    } finally {
      t.cleanup();
    }
  });
});
