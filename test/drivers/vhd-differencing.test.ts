/**
 * Differencing VHDs: a child built here (bitmaps, parent locators) over a parent made by qemu-img,
 * read through the chain byte for byte; parent resolution from W2ru/W2ku/MacX locators and the
 * parent name, in either UTF-16 byte order.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { GuestReader } from '../../src/guest.js';
import { mapChain } from '../../src/map.js';
import { checkImage } from '../../src/check.js';
import { FormatError } from '../../src/errors.js';
import { openImage } from '../../src/image.js';
import { rawDriver } from '../../drivers/raw/index.js';
import { decodeFooter, encodeUtf16, vhdDriver } from '../../drivers/vhd/index.js';
import { memOpener } from '../support/devices.js';
import { qemuAvailable, qemuImg, qemuIo, withTmpDir } from '../support/qemu.js';
import { DISK_DIFFERENCING, UUID_A, UUID_B, buildDynamic, openVhd, type BlockSpec, type LocatorSpec } from './vhd-support.js';

const run = qemuAvailable();
const tmp = withTmpDir('imgconv-vhd-diff-');
afterAll(() => tmp.cleanup());

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return b;
}

/** The child's blocks: partial bitmaps, a full block, an allocated block with nothing present. */
function childBlocks(): Map<number, BlockSpec> {
  return new Map<number, BlockSpec>([
    [0, { present: [0, 1, 2, 3, 4, 5, 6, 7, 100, 4095], data: pattern(BLOCK, 1) }],
    [2, { data: pattern(BLOCK, 2) }],
    [3, { present: [], data: 0x77 }],
  ]);
}

/** What the guest sees: the parent, overlaid by the child's present sectors. */
function overlay(parent: Uint8Array, blocks: Map<number, BlockSpec>, virtualSize: number): Uint8Array {
  const out = new Uint8Array(virtualSize);
  out.set(parent.subarray(0, virtualSize));
  for (const [k, spec] of blocks) {
    const data = typeof spec.data === 'number' ? new Uint8Array(BLOCK).fill(spec.data) : spec.data;
    const sectors = spec.present ?? Array.from({ length: BLOCK / 512 }, (_, i) => i);
    for (const s of sectors) {
      const g = k * BLOCK + s * 512;
      if (g < virtualSize) out.set(data.subarray(s * 512, s * 512 + 512), g);
    }
  }
  return out;
}

describe.runIf(run)('differencing child over a qemu-img parent', () => {
  const parent = tmp.path('parent.vhd');
  const child = tmp.path('child.vhd');
  let parentRaw: Uint8Array;
  let vs = 0;

  it('builds the chain', () => {
    qemuImg(['create', '-f', 'vpc', parent, '8M']);
    qemuIo(parent, 'vpc', ['write -P 0x11 0 3M', 'write -P 0x22 5M 1M', 'write -P 0x33 7M 64k']);
    qemuImg(['convert', '-f', 'vpc', '-O', 'raw', parent, `${parent}.raw`]);
    parentRaw = new Uint8Array(readFileSync(`${parent}.raw`));
    vs = parentRaw.length;
    const pf = decodeFooter(new Uint8Array(readFileSync(parent).subarray(0, 512)));
    const locators: LocatorSpec[] = [
      { code: 'W2ku', bytes: encodeUtf16('C:\\vms\\parent.vhd', 'le') },
      { code: 'W2ru', bytes: encodeUtf16('.\\parent.vhd', 'le') },
      { code: 'MacX', bytes: new TextEncoder().encode(`file://${parent}`) },
    ];
    const built = buildDynamic({
      virtualSize: Number(pf.currentSize),
      creatorApp: pf.creatorApp,
      geometry: pf.geometry,
      diskType: DISK_DIFFERENCING,
      blocks: childBlocks(),
      parentUuid: pf.uuid,
      parentName: 'parent.vhd',
      locators,
      uuid: UUID_B,
    });
    writeFileSync(child, built.bytes);
  });

  it('opens the child with the parent found through the W2ru locator', async () => {
    const chain = await openVhd(child);
    try {
      expect(chain.layers.length).toBe(2);
      const info = chain.layers[0]!.info;
      expect(info.subformat).toBe('differencing');
      expect(info.virtualSize).toBe(vs);
      expect(info.backing).toEqual({ filename: './parent.vhd', format: 'vhd' });
      expect(info.details['parent-source']).toBe('W2ru');
      expect(info.details['parent-uuid-match']).toBe(true);
      expect(info.details['parent-name']).toBe('parent.vhd');
      expect(info.details['parent-locators']).toContain('W2ku "C:\\\\vms\\\\parent.vhd"');
      expect(chain.paths[1]).toBe(parent);
      expect(chain.layers[1]!.info.subformat).toBe('dynamic');
    } finally {
      await chain.close();
    }
  });

  it('reads the guest content byte for byte: child sectors where the bitmap says so, parent elsewhere', async () => {
    const chain = await openVhd(child);
    try {
      const reader = await GuestReader.create(chain);
      const got = await reader.read(0, vs);
      const want = overlay(parentRaw, childBlocks(), vs);
      expect(Buffer.compare(Buffer.from(got), Buffer.from(want))).toBe(0);
      // The mapping says the same thing per sector.
      const map = await chain.layers[0]!.mapping();
      expect(map.range(0, 4096).next().value).toMatchObject({ kind: 'data', length: 4096 });
      expect([...map.range(4096, 512)][0]!.kind).toBe('unallocated');
      expect([...map.range(100 * 512, 512)][0]!.kind).toBe('data');
      expect([...map.range(BLOCK, BLOCK)].every((e) => e.kind === 'unallocated')).toBe(true);
      expect([...map.range(3 * BLOCK, vs - 3 * BLOCK)].every((e) => e.kind === 'unallocated')).toBe(true);
      const entries = await mapChain(chain);
      expect(entries.some((e) => e.depth === 1 && e.data)).toBe(true);
    } finally {
      await chain.close();
    }
  });

  it('checks clean; hostSpace records locators, bitmaps and blocks', async () => {
    const chain = await openVhd(child);
    try {
      const r = await checkImage(chain.layers[0]!);
      expect(r.messages).toEqual([]);
      expect(r.corruptions + r.leaks).toBe(0);
      expect(r.allocatedClusters).toBe(3);
      const hs = await chain.layers[0]!.hostSpace();
      const what = hs.ranges().map((x) => x.what);
      expect(what.filter((w) => w.startsWith('parent locator')).length).toBe(3);
      expect(what.filter((w) => w === 'block bitmap').length).toBe(3);
      expect(hs.free()).toEqual([]);
    } finally {
      await chain.close();
    }
  });

  it('differs from QEMU, which opens a differencing VHD as a plain dynamic disk without its parent', async () => {
    const info = JSON.parse(qemuImg(['info', '--output=json', '-f', 'vpc', child])) as Record<string, unknown>;
    expect(info['backing-filename']).toBeUndefined();
    qemuImg(['convert', '-f', 'vpc', '-O', 'raw', child, `${child}.raw`]);
    const qemuView = new Uint8Array(readFileSync(`${child}.raw`));
    // QEMU ignores the bitmap: block 0 is the child's whole block, block 1 (unallocated) reads zeros.
    expect(Buffer.from(qemuView.subarray(0, BLOCK)).equals(Buffer.from(pattern(BLOCK, 1)))).toBe(true);
    expect(qemuView.subarray(BLOCK, 2 * BLOCK).every((b) => b === 0)).toBe(true);
  });
});

describe('parent resolution (in memory)', () => {
  const size = 4 * MiB;
  function parentBytes(uuid: Uint8Array, fill: number): Uint8Array {
    return buildDynamic({ virtualSize: size, uuid, blocks: new Map([[0, { data: fill }]]) }).bytes;
  }
  function childBytes(locators: LocatorSpec[], parentName = ''): Uint8Array {
    return buildDynamic({ virtualSize: size, diskType: DISK_DIFFERENCING, parentUuid: UUID_A, parentName, locators, uuid: UUID_B, blocks: new Map([[1, { present: [0], data: 0x99 }]]) }).bytes;
  }
  async function open(files: Map<string, Uint8Array>) {
    return openImage('/vm/child.vhd', { drivers: [vhdDriver, rawDriver], opener: memOpener(files) });
  }

  it('skips a W2ru that names nothing and takes an absolute W2ku stored big-endian', async () => {
    const files = new Map([
      ['/vm/child.vhd', childBytes([{ code: 'W2ru', bytes: encodeUtf16('.\\gone.vhd', 'le') }, { code: 'W2ku', bytes: encodeUtf16('/store/base.vhd', 'be') }])],
      ['/store/base.vhd', parentBytes(UUID_A, 0x42)],
    ]);
    const chain = await open(files);
    try {
      expect(chain.layers[0]!.info.details['parent-source']).toBe('W2ku');
      expect(chain.paths[1]).toBe('/store/base.vhd');
      const reader = await GuestReader.create(chain);
      expect((await reader.read(0, 4))[0]).toBe(0x42);
      expect((await reader.read(2 * MiB, 1024))[0]).toBe(0x99);
      expect((await reader.read(2 * MiB, 1024))[512]).toBe(0);
    } finally {
      await chain.close();
    }
  });

  it('prefers the candidate whose footer carries the parent UUID (MacX URL with escapes, UTF-16 BOM)', async () => {
    const files = new Map([
      ['/vm/child.vhd', childBytes([
        { code: 'W2ru', bytes: Uint8Array.from([0xff, 0xfe, ...encodeUtf16('other.vhd', 'le')]) },
        { code: 'MacX', bytes: new TextEncoder().encode('file:///data/my%20base.vhd') },
      ])],
      ['/vm/other.vhd', parentBytes(UUID_B, 0x01)],
      ['/data/my base.vhd', parentBytes(UUID_A, 0x02)],
    ]);
    const chain = await open(files);
    try {
      const info = chain.layers[0]!.info;
      expect(info.details['parent-source']).toBe('MacX');
      expect(info.details['parent-uuid-match']).toBe(true);
      expect(chain.paths[1]).toBe('/data/my base.vhd');
    } finally {
      await chain.close();
    }
  });

  it('takes an existing parent with the wrong UUID, and check() reports it', async () => {
    const files = new Map([
      ['/vm/child.vhd', childBytes([{ code: 'W2ru', bytes: encodeUtf16('.\\other.vhd', 'le') }])],
      ['/vm/other.vhd', parentBytes(UUID_B, 0x01)],
    ]);
    const chain = await open(files);
    try {
      expect(chain.layers[0]!.info.details['parent-uuid-match']).toBe(false);
      const r = await checkImage(chain.layers[0]!);
      expect(r.corruptions).toBe(1);
      expect(r.messages.join('\n')).toMatch(/UUID/);
    } finally {
      await chain.close();
    }
  });

  it('falls back to the header parent name', async () => {
    const files = new Map([
      ['/vm/child.vhd', childBytes([], 'base.vhd')],
      ['/vm/base.vhd', parentBytes(UUID_A, 0x03)],
    ]);
    const chain = await open(files);
    try {
      expect(chain.layers[0]!.info.details['parent-source']).toBe('parent name');
      expect(chain.layers.length).toBe(2);
    } finally {
      await chain.close();
    }
  });

  it('names the first candidate when no parent exists (the chain open then fails on it)', async () => {
    const files = new Map([['/vm/child.vhd', childBytes([{ code: 'W2ru', bytes: encodeUtf16('.\\missing.vhd', 'le') }])]]);
    await expect(open(files)).rejects.toThrow(/missing\.vhd/);
  });

  it('refuses a differencing disk that names no parent', async () => {
    const files = new Map([['/vm/child.vhd', childBytes([{ code: 'Mac ', bytes: new Uint8Array(16) }])]]);
    const err = await open(files).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FormatError);
    expect((err as FormatError).field).toBe('parent locators');
  });

  it('reports an unusable locator (data past the end of the file)', async () => {
    const bytes = childBytes([{ code: 'W2ru', bytes: encodeUtf16('.\\base.vhd', 'le') }, { code: 'W2ku', bytes: encodeUtf16('x', 'le') }]);
    // Point the second locator (index 1) far past the end of the file; fix the header checksum.
    const dv = new DataView(bytes.buffer);
    dv.setBigUint64(512 + 576 + 24 + 16, 1n << 40n, false);
    const { vhdChecksum } = await import('../../drivers/vhd/index.js');
    dv.setUint32(512 + 36, vhdChecksum(bytes.subarray(512, 1536), 36), false);
    const files = new Map([['/vm/child.vhd', bytes], ['/vm/base.vhd', parentBytes(UUID_A, 0x03)]]);
    const chain = await open(files);
    try {
      const r = await checkImage(chain.layers[0]!);
      expect(r.corruptions).toBe(1);
      expect(r.messages[0]).toMatch(/parent locator 1 \(W2ku\).*past the end/);
    } finally {
      await chain.close();
    }
  });
});
