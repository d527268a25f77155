/**
 * The QED driver against qemu-img 7.2: images made by qemu-img/qemu-io in every variant, compared on
 * virtual size, map, guest content and check counts; then crafted leaks and corruptions.
 */
import { createHash } from 'node:crypto';
import { appendFileSync, copyFileSync, openSync, closeSync, readFileSync, writeSync, createReadStream } from 'node:fs';
import { afterAll, describe, expect, test } from 'vitest';
import { openFileDevice } from '../../src/blockdev/file.js';
import type { CheckReport, SourceImage } from '../../src/driver.js';
import { FormatError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import { openImage, type ImageChain } from '../../src/image.js';
import { mapChain, type MapEntry } from '../../src/map.js';
import { qedDriver } from '../../drivers/qed/index.js';
import { rawDriver } from '../../drivers/raw/index.js';
import { NoWriteDevice } from '../support/devices.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const haveQemu = qemuAvailable();
const tmp = withTmpDir('imgconv-qed-');
afterAll(() => tmp.cleanup());

async function openChain(path: string): Promise<ImageChain> {
  return openImage(path, {
    drivers: [qedDriver, rawDriver],
    opener: async (p, o) => new NoWriteDevice(await openFileDevice(p, { ...o, write: false })),
  });
}

interface Norm {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  data: boolean;
  zero?: boolean;
  offset?: number;
}

/** Merges what qemu-img and imgconv may split differently; `zero` is compared only where data is false. */
function normalise(entries: (MapEntry | Record<string, unknown>)[]): Norm[] {
  const out: Norm[] = [];
  for (const raw of entries) {
    const e = raw as unknown as MapEntry;
    const n: Norm = { start: e.start, length: e.length, depth: e.depth, present: e.present, data: e.data };
    if (!e.data) n.zero = e.zero;
    if (e.offset !== undefined) n.offset = e.offset;
    const p = out[out.length - 1];
    if (
      p && p.depth === n.depth && p.present === n.present && p.data === n.data && p.zero === n.zero &&
      ((p.offset === undefined && n.offset === undefined) || (p.offset !== undefined && n.offset !== undefined && p.offset + p.length === n.offset))
    ) p.length += n.length;
    else out.push(n);
  }
  return out;
}

function qemuCheck(path: string): { status: number; json: Record<string, number> } {
  const r = qemuImgStatus(['check', '--output=json', path]);
  return { status: r.status, json: JSON.parse(r.stdout) };
}

/** Our counts in qemu-img's JSON shape, where absent means 0. */
function asQemuCounts(r: CheckReport): Record<string, number> {
  return {
    corruptions: r.corruptions,
    leaks: r.leaks,
    'check-errors': r.checkErrors,
    'total-clusters': r.totalClusters ?? 0,
    'allocated-clusters': r.allocatedClusters ?? 0,
    'fragmented-clusters': r.fragmentedClusters ?? 0,
  };
}

function qemuCounts(j: Record<string, number>): Record<string, number> {
  const keys = ['corruptions', 'leaks', 'check-errors', 'total-clusters', 'allocated-clusters', 'fragmented-clusters'];
  return Object.fromEntries(keys.map((k) => [k, j[k] ?? 0]));
}

async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Everything qemu-img can tell about the image, compared with what the driver says. */
async function compareWithQemu(path: string, opts: { content?: boolean } = {}): Promise<{ chain: ImageChain; top: SourceImage }> {
  const chain = await openChain(path);
  const top = chain.layers[0]!;
  const info = JSON.parse(qemuImg(['info', '--output=json', path]));
  expect(top.info.virtualSize).toBe(info['virtual-size']);
  expect(top.info.clusterSize).toBe(info['cluster-size']);
  expect(top.info.backing?.filename).toBe(info['backing-filename']);
  expect(top.info.backing?.format).toBe(info['backing-filename-format']);
  const qmap = JSON.parse(qemuImg(['map', '--output=json', path]));
  expect(normalise(await mapChain(chain))).toEqual(normalise(qmap));
  if (opts.content !== false) {
    const rawPath = `${path}.raw`;
    qemuImg(['convert', '-O', 'raw', path, rawPath]);
    expect(await (await GuestReader.create(chain)).sha256()).toBe(await sha256File(rawPath));
  }
  const ours = await top.check();
  const q = qemuCheck(path);
  expect(asQemuCounts(ours)).toEqual(qemuCounts(q.json));
  expect(ours.corruptions + ours.leaks).toBe(0);
  const hs = await top.hostSpace();
  expect(hs.ranges().length).toBeGreaterThan(0);
  return { chain, top };
}

function create(name: string, size: string, options: string[] = []): string {
  const p = tmp.path(name);
  qemuImg(['create', '-q', '-f', 'qed', ...(options.length ? ['-o', options.join(',')] : []), p, size]);
  return p;
}

/** Writes that exercise contiguous, fragmented, zero and overwritten clusters. */
const WRITES = [
  'write -P 0x11 0 100k',
  'write -P 0x22 1M 64k',
  'write -z 200k 64k',
  'write -P 0x33 3M 8k',
  'write -P 0x44 512k 4k',
  'write -z 1M 4k',
  'write -z 2M 1M', // cluster-aligned for every cluster size: zero clusters, not zero-filled data
];

describe.skipIf(!haveQemu)('variants made by qemu-img', () => {
  for (const cs of ['4k', '64k', '1M']) {
    for (const ts of [2, 4, 16]) {
      test(`cluster_size=${cs} table_size=${ts}`, async () => {
        const p = create(`v-${cs}-${ts}.qed`, '8M', [`cluster_size=${cs}`, `table_size=${ts}`]);
        qemuIo(p, 'qed', WRITES);
        const { chain, top } = await compareWithQemu(p);
        expect(top.info.details['table-size']).toBe(ts);
        expect(top.info.features).toContain('zero clusters');
        await chain.close();
      });
    }
  }

  test('default options, empty image', async () => {
    const p = create('empty.qed', '64M');
    const { chain, top } = await compareWithQemu(p);
    expect(top.info.details).toMatchObject({ 'cluster-size': 65536, 'table-size': 4, 'header-size': 1, features: 0 });
    const hs = await top.hostSpace();
    expect(hs.ranges().map((r) => [r.start, r.length, r.role])).toEqual([
      [0, 65536, 'header'],
      [65536, 4 * 65536, 'metadata'],
    ]);
    await chain.close();
  });

  test('odd virtual size 1000448 bytes: the last cluster is partial', async () => {
    const p = create('odd.qed', '1000448');
    qemuIo(p, 'qed', ['write -P 0x5a 0 64k', 'write -P 0x6b 983040 17408']);
    const { chain, top } = await compareWithQemu(p);
    const map = await top.mapping();
    const last = map.at(map.count - 1);
    expect(last.guest + last.length).toBe(1000448);
    expect(last.kind).toBe('data');
    // The host cluster is whole even though the guest sees only 17408 bytes of it.
    const hs = await top.hostSpace();
    expect(hs.ranges().some((r) => r.what === 'data cluster tail past the virtual size' && r.length === 65536 - 17408)).toBe(true);
    await chain.close();
  });

  test('sparse 10 GiB image with writes spread out', async () => {
    const p = create('sparse.qed', '10G');
    qemuIo(p, 'qed', ['write -P 0x01 0 64k', 'write -P 0x02 3G 128k', 'write -z 5G 1M', 'write -P 0x03 10239M 1M']);
    const { chain, top } = await compareWithQemu(p, { content: false });
    const reader = await GuestReader.create(chain);
    expect([...(await reader.read(3 * 2 ** 30 + 131071, 2))]).toEqual([0x02, 0]);
    expect((await reader.read(10 * 2 ** 30 - 1, 1))[0]).toBe(0x03);
    expect(top.info.details['l2-tables']).toBe(4);
    await chain.close();
  });

  test('backing file in QED', async () => {
    const base = create('base.qed', '4M');
    qemuIo(base, 'qed', ['write -P 0x77 0 1M']);
    const top = tmp.path('over-qed.qed');
    qemuImg(['create', '-q', '-f', 'qed', '-b', 'base.qed', '-F', 'qed', top]);
    qemuIo(top, 'qed', ['write -P 0x88 64k 64k', 'write -z 256k 64k']);
    const { chain, top: img } = await compareWithQemu(top);
    expect(img.info.backing).toEqual({ filename: 'base.qed' });
    expect(img.info.details['backing-format-no-probe']).toBe(false);
    expect(chain.layers.map((l) => l.format)).toEqual(['qed', 'qed']);
    await chain.close();
  });

  test('backing file raw (-F raw sets BACKING_FORMAT_NO_PROBE)', async () => {
    const base = tmp.path('base.raw');
    qemuImg(['create', '-q', '-f', 'raw', base, '4M']);
    qemuIo(base, 'raw', ['write -P 0x99 0 2M']);
    const top = tmp.path('over-raw.qed');
    qemuImg(['create', '-q', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', top]);
    qemuIo(top, 'qed', ['write -P 0xaa 1M 64k']);
    const { chain, top: img } = await compareWithQemu(top);
    expect(img.info.backing).toEqual({ filename: 'base.raw', format: 'raw' });
    expect(img.info.details.features).toBe(5);
    expect(chain.layers.map((l) => l.format)).toEqual(['qed', 'raw']);
    await chain.close();
  });

  test('table_size=1: qemu-img creates it but cannot open it; imgconv reads it', async () => {
    const p = create('ts1.qed', '16M', ['cluster_size=4k', 'table_size=1']);
    expect(qemuImgStatus(['info', p]).stderr).toMatch(/QED table offset is invalid/);
    const chain = await openChain(p);
    expect((await chain.layers[0]!.mapping()).toArray()).toEqual([{ guest: 0, length: 16 << 20, kind: 'unallocated' }]);
    expect(await chain.layers[0]!.check()).toMatchObject({ corruptions: 0, leaks: 0, totalClusters: 4096 });
    await chain.close();
  });
});

/** L1 at 64 KiB (4 clusters), L2 of L1 entry 0 at 384 KiB, data: guest 512K → 320K, 0 → 640K, 64K → 704K; file 768 KiB. */
function crafted(name: string): { path: string; l2: number } {
  const p = tmp.path(name);
  qemuImg(['create', '-q', '-f', 'qed', p, '1G']);
  qemuIo(p, 'qed', ['write -P 1 512k 64k', 'write -P 2 0 64k', 'write -z 128k 64k', 'write -P 3 64k 64k']);
  const l1 = Number(readFileSync(p).readBigUInt64LE(65536));
  expect(l1).toBe(384 * 1024);
  return { path: p, l2: l1 };
}

function poke(path: string, offset: number, value: bigint | number): void {
  const fd = openSync(path, 'r+');
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(value));
  writeSync(fd, b, 0, 8, offset);
  closeSync(fd);
}

async function bothChecks(path: string): Promise<{ ours: CheckReport; qemu: Record<string, number>; img: SourceImage; chain: ImageChain }> {
  const chain = await openChain(path);
  const img = chain.layers[0]!;
  const ours = await img.check();
  const q = qemuCheck(path);
  expect(asQemuCounts(ours)).toEqual(qemuCounts(q.json));
  return { ours, qemu: q.json, img, chain };
}

async function fieldOf(p: Promise<unknown>): Promise<string> {
  const e = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(FormatError);
  return (e as FormatError).field;
}

describe.skipIf(!haveQemu)('crafted damage, counted as qemu-img check counts it', () => {
  test('an appended unreferenced cluster is exactly one leak', async () => {
    const { path } = crafted('leak.qed');
    appendFileSync(path, Buffer.alloc(65536, 7));
    const { ours, chain } = await bothChecks(path);
    expect(ours.leaks).toBe(1);
    expect(ours.messages).toEqual(['Leaked cluster 12 (offset 786432 (0xc0000)): nothing references it']);
    await chain.close();
  });

  test('a partial cluster at the end of the file is not a leak (QEMU rounds the file size down)', async () => {
    const { path } = crafted('partial.qed');
    appendFileSync(path, Buffer.alloc(100, 7));
    expect((await bothChecks(path)).ours.leaks).toBe(0);
    appendFileSync(path, Buffer.alloc(65536, 7));
    expect((await bothChecks(path)).ours.leaks).toBe(1);
  });

  test('an L2 entry past the end of the file', async () => {
    const { path, l2 } = crafted('past-eof.qed');
    poke(path, l2 + 9 * 8, 10 << 20);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(1);
    expect(await fieldOf(img.mapping())).toBe('L2 table 0 entry 9');
    expect(await fieldOf(img.hostSpace())).toBe('L2 table 0 entry 9');
    await chain.close();
  });

  test('an unaligned L2 entry', async () => {
    const { path, l2 } = crafted('unaligned.qed');
    poke(path, l2 + 9 * 8, 655360 + 5);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(1);
    expect(await fieldOf(img.mapping())).toBe('L2 table 0 entry 9');
    await chain.close();
  });

  test('a data cluster referenced twice', async () => {
    const { path, l2 } = crafted('twice.qed');
    poke(path, l2 + 9 * 8, 655360);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(1);
    expect(ours.messages[0]).toMatch(/cluster 10 .* referenced more than once \(again by L2 table 0 entry 9\)/);
    // Reads still work as in QEMU, but the host-space map refuses the shared cluster.
    await img.mapping();
    await expect(img.hostSpace()).rejects.toThrow(/overlaps/);
    await chain.close();
  });

  test('a data entry pointing into the L1 table', async () => {
    const { path, l2 } = crafted('into-l1.qed');
    poke(path, l2 + 9 * 8, 65536);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(1);
    expect(await fieldOf(img.mapping())).toBe('L2 table 0 entry 9');
    await chain.close();
  });

  test('a second L1 entry pointing at the same L2 table', async () => {
    const { path, l2 } = crafted('l2-twice.qed');
    poke(path, 65536 + 8, l2);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(4);
    expect(await fieldOf(img.mapping())).toBe('L1 table entry 1');
    await chain.close();
  });

  test('an L2 table overlapping another and a data cluster', async () => {
    const { path } = crafted('l2-overlap.qed');
    poke(path, 65536 + 8, 448 * 1024);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(4);
    expect(await fieldOf(img.mapping())).toBe('L1 table entry 1');
    await chain.close();
  });

  test('an L1 entry of 1 (the zero marker is for L2 tables only)', async () => {
    const { path } = crafted('l1-one.qed');
    poke(path, 65536 + 8, 1);
    const { ours, img, chain } = await bothChecks(path);
    expect(ours.corruptions).toBe(1);
    expect(await fieldOf(img.mapping())).toBe('L1 table entry 1');
    await chain.close();
  });

  test('NEED_CHECK: dirty here (qemu-img info reports dirty-flag false for QED), counts unchanged', async () => {
    const { path } = crafted('need-check.qed');
    poke(path, 16, 2);
    const { ours, img, chain } = await bothChecks(path);
    expect(img.info.dirty).toBe(true);
    expect(ours.corruptions + ours.leaks).toBe(0);
    await chain.close();
  });

  test('4 KiB clusters past 16 MiB: qemu-img counts floor(N / 4095) leaks that do not exist', async () => {
    const p = create('phantom.qed', '64M', ['cluster_size=4k']);
    qemuIo(p, 'qed', ['write -P 0xab 0 20M']);
    const chain = await openChain(p);
    const ours = await chain.layers[0]!.check();
    const q = qemuCheck(p).json;
    const n = Math.floor(readFileSync(p).length / 4096);
    expect(ours.leaks).toBe(0);
    expect(q.leaks).toBe(ours.leaks + Math.floor(n / 4095));
    expect(q.leaks).toBe(1);
    expect(asQemuCounts(ours)).toEqual({ ...qemuCounts(q), leaks: 0 });
    await chain.close();
  });

  test('copying a clean image keeps it clean', async () => {
    const { path } = crafted('clean.qed');
    const copy = `${path}.copy`;
    copyFileSync(path, copy);
    const { ours, chain } = await bothChecks(copy);
    expect(ours).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 3, fragmentedClusters: 1, totalClusters: 16384 });
    await chain.close();
  });
});
