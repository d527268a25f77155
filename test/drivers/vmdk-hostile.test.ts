/**
 * VMDK hostile and hand-built input: every header field and table-entry class refused with a
 * FormatError naming the field, check() counting what mapping() refuses, VMware-style GD_AT_END
 * streams (checked against qemu-img too), the parent CID link, and a mutation fuzz.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { writeFileSync } from 'node:fs';
import { encodeSparseHeader, decodeSparseHeader, validateSparseHeader, GD_AT_END, type SparseExtentHeader } from '../../drivers/vmdk/header.js';
import { encodeDescriptor, type Descriptor } from '../../drivers/vmdk/descriptor.js';
import { encodeGrainMarker } from '../../drivers/vmdk/markers.js';
import { vmdkDriver } from '../../drivers/vmdk/index.js';
import { rawDriver } from '../../drivers/raw/index.js';
import type { SparseImage } from '../../drivers/vmdk/sparse.js';
import { FormatError, ImgconvError, IoError, UnsupportedError } from '../../src/errors.js';
import type { DeviceOpener } from '../../src/blockdev/types.js';
import { openImage, type ImageChain } from '../../src/image.js';
import { GuestReader } from '../../src/guest.js';
import { checkImage } from '../../src/check.js';
import { memOpener } from '../support/devices.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { buildSparse, pattern, type Built } from './vmdk-build.js';
import { normaliseMap, ourMap, qemuMap, qemuRawSha } from './vmdk-support.js';

const G = 4096; // builder default grain: 8 sectors

async function openMem(files: Record<string, Uint8Array>, top = '/m/a.vmdk', format?: string): Promise<ImageChain> {
  const inner = memOpener(new Map(Object.entries(files)));
  // Like FileBlockDevice: a missing file is an IoError.
  const opener: DeviceOpener = async (p, o) => {
    if (!(p in files)) throw new IoError('open', p, 0, 'ENOENT', 'no such file');
    return inner(p, o);
  };
  return openImage(top, { drivers: [vmdkDriver, rawDriver], opener, ...(format ? { format } : {}) });
}

async function errorOf(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  return undefined;
}

function withHeader(b: Built, patch: Partial<SparseExtentHeader>): Uint8Array {
  const x = b.bytes.slice();
  x.set(encodeSparseHeader({ ...decodeSparseHeader(x), ...patch }));
  return x;
}

function u32At(bytes: Uint8Array, at: number, v: number): Uint8Array {
  const x = bytes.slice();
  new DataView(x.buffer).setUint32(at, v, true);
  return x;
}

/** Opens, maps, host-spaces and reads the whole disk. */
async function readAll(bytes: Uint8Array): Promise<string> {
  const chain = await openMem({ '/m/a.vmdk': bytes }, '/m/a.vmdk', 'vmdk');
  try {
    await chain.layers[0]!.hostSpace();
    return await (await GuestReader.create(chain)).sha256();
  } finally {
    await chain.close();
  }
}

const grains = new Map<number, Uint8Array | 'zero'>([
  [0, pattern(G, 1)],
  [3, pattern(G, 2)],
  [5, 'zero'],
  [700, pattern(G, 3)],
]);
const sparse = buildSparse({ capacitySectors: 8 * 1024, zeroedGrain: true, rgd: true, grains });
const stream = buildSparse({ capacitySectors: 8 * 1024, stream: true, grains: new Map([...grains].filter(([, v]) => v !== 'zero')) });
const vmwareStream = buildSparse({ capacitySectors: 8 * 1024 + 5, stream: true, gdAtEnd: true, grains: new Map([[0, pattern(G, 1)], [3, pattern(G, 2)], [700, pattern(G, 3)], [1024, pattern(G, 4)]]) });

describe('hand-built images read back', () => {
  it('monolithicSparse with zeroed grains, RGD: mapping kinds and content', async () => {
    const chain = await openMem({ '/m/a.vmdk': sparse.bytes });
    const img = chain.layers[0]!;
    const map = (await img.mapping()).toArray();
    expect(map.find((e) => e.guest === 0)).toMatchObject({ kind: 'data', host: sparse.grainOffsets.get(0), length: G });
    expect(map.find((e) => e.guest === 5 * G)).toMatchObject({ kind: 'zero', length: G });
    expect(map.find((e) => e.guest === 6 * G)).toMatchObject({ kind: 'unallocated' });
    const r = await (await GuestReader.create(chain)).read(3 * G, G);
    expect(r).toEqual(pattern(G, 2));
    const whats = new Set((await img.hostSpace()).ranges().map((x) => x.what));
    for (const w of ['header', 'embedded descriptor', 'redundant grain directory', 'redundant grain table', 'grain directory', 'grain table', 'data']) expect(whats).toContain(w);
    expect((await img.check()).corruptions).toBe(0);
  });

  it('streamOptimized written as VMware streams it (GD_AT_END, footer, markers, partial last grain)', async () => {
    const chain = await openMem({ '/m/a.vmdk': vmwareStream.bytes });
    const img = chain.layers[0]! as SparseImage;
    expect(img.info.subformat).toBe('streamOptimized');
    expect(img.info.virtualSize).toBe((8 * 1024 + 5) * 512);
    expect(img.info.features).toContain('footer (GD at end)');
    const reader = await GuestReader.create(chain);
    expect(await reader.read(700 * G, G)).toEqual(pattern(G, 3));
    // The last grain is partial: 5 of its 8 sectors are inside the capacity.
    const lastLen = img.info.virtualSize - 1024 * G;
    expect(await reader.read(1024 * G, lastLen)).toEqual(pattern(G, 4).subarray(0, lastLen));
    const ranges = (await img.hostSpace()).ranges();
    const whats = new Set(ranges.map((x) => x.what));
    for (const w of ['grain marker', 'compressed data', 'grain table marker', 'grain directory marker', 'footer marker', 'footer', 'end-of-stream marker']) expect(whats).toContain(w);
    expect((await img.check()).corruptions).toBe(0);
  });

  it('unclean shutdown is reported as dirty', async () => {
    const b = buildSparse({ capacitySectors: 64, uncleanShutdown: true, grains: new Map() });
    const chain = await openMem({ '/m/a.vmdk': b.bytes });
    expect(chain.layers[0]!.info.dirty).toBe(true);
  });

  it('unallocated grains read the parent; a wrong parent CID is refused', async () => {
    const parent = buildSparse({ capacitySectors: 64, grains: new Map([[1, pattern(G, 9)]]), descriptor: { cid: 0xabcdef01 } });
    const child = buildSparse({ capacitySectors: 64, grains: new Map([[2, pattern(G, 8)]]), descriptor: { parentCid: 0xabcdef01, parentFileNameHint: 'p.vmdk' } });
    const chain = await openMem({ '/m/a.vmdk': child.bytes, '/m/p.vmdk': parent.bytes });
    expect(chain.layers.length).toBe(2);
    expect(chain.layers[0]!.info.backing).toEqual({ filename: 'p.vmdk', format: 'vmdk' });
    const r = await GuestReader.create(chain);
    expect(await r.read(G, G)).toEqual(pattern(G, 9));
    expect(await r.read(2 * G, G)).toEqual(pattern(G, 8));
    const stale = buildSparse({ capacitySectors: 64, grains: new Map(), descriptor: { parentCid: 0xabcdef02, parentFileNameHint: 'p.vmdk' } });
    const err = await errorOf(openMem({ '/m/a.vmdk': stale.bytes, '/m/p.vmdk': parent.bytes }));
    expect(err).toBeInstanceOf(FormatError);
    expect((err as FormatError).field).toBe('parentCID');
    // A parent that is not VMDK: QEMU refuses to read through it.
    const err2 = await errorOf(openMem({ '/m/a.vmdk': child.bytes, '/m/p.vmdk': new Uint8Array(32768) }));
    expect((err2 as FormatError).field).toBe('parentFileNameHint');
    // parentCID ffffffff: no parent, whatever the hint says.
    const orphan = buildSparse({ capacitySectors: 64, grains: new Map(), descriptor: { parentFileNameHint: 'p.vmdk' } });
    expect((await openMem({ '/m/a.vmdk': orphan.bytes })).layers.length).toBe(1);
  });
});

describe.runIf(qemuAvailable())('hand-built images against qemu-img', () => {
  const tmp = withTmpDir('imgconv-vmdk-built-');
  afterAll(() => tmp.cleanup());
  const cases: [string, Built][] = [
    ['monolithicSparse with RGD and zeroed grains', sparse],
    ['streamOptimized (QEMU layout, EOS marker)', stream],
    ['streamOptimized GD_AT_END', vmwareStream],
  ];
  for (const [name, b] of cases) {
    it(`${name}: map, content and check agree`, async () => {
      const f = tmp.path(`${name.replace(/\W+/g, '_')}.vmdk`);
      writeFileSync(f, b.bytes);
      const chain = await openImage(f, { drivers: [vmdkDriver, rawDriver] });
      try {
        expect(normaliseMap(await ourMap(chain))).toEqual(normaliseMap(qemuMap(f)));
        expect(await (await GuestReader.create(chain)).sha256()).toBe(qemuRawSha(f, f + '.raw'));
        expect((await chain.layers[0]!.check()).corruptions).toBe(0);
        expect(qemuImgStatus(['check', f]).status).toBe(0);
      } finally {
        await chain.close();
      }
    });
  }
  it('a grain past EOF: qemu-img check and check() both report a corruption', async () => {
    const gte = sparse.gtOffsets[0]! + 3 * 4;
    const bad = u32At(sparse.bytes, gte, sparse.bytes.length / 512 + 100);
    const f = tmp.path('past-eof.vmdk');
    writeFileSync(f, bad);
    expect(qemuImgStatus(['check', f]).status).not.toBe(0);
    const chain = await openImage(f, { drivers: [vmdkDriver] });
    const r = await checkImage(chain.layers[0]!);
    expect(r.corruptions).toBeGreaterThan(0);
    expect(r.messages.join('\n')).toContain('grain table entry 0/3');
    await chain.close();
    expect(qemuImg(['info', f])).toContain('vmdk');
  });
});

describe('header fields are validated', () => {
  const size = sparse.bytes.length;
  const h = decodeSparseHeader(sparse.bytes);
  const bad: [string, Partial<SparseExtentHeader>, string][] = [
    ['magic', { magic: 0x12345678 }, 'magic'],
    ['version 0', { version: 0 }, 'version'],
    ['grainSize 0', { grainSize: 0n }, 'grainSize'],
    ['grainSize not a power of two', { grainSize: 24n }, 'grainSize'],
    ['grainSize over 1 GiB', { grainSize: 0x400000n }, 'grainSize'],
    ['grainSize 2^64-1', { grainSize: 0xffffffffffffffffn }, 'grainSize'],
    ['numGTEsPerGT 0', { numGTEsPerGT: 0 }, 'numGTEsPerGT'],
    ['numGTEsPerGT 513', { numGTEsPerGT: 513 }, 'numGTEsPerGT'],
    ['capacity beyond 2^53 bytes', { capacity: 1n << 60n }, 'capacity'],
    ['capacity needing > 32 Mi GD entries', { capacity: 1n << 44n, grainSize: 1n }, 'capacity'],
    ['capacity whose GD runs past EOF', { capacity: 1n << 34n }, 'gdOffset'],
    ['overHead past EOF', { overHead: 1n << 20n }, 'overHead'],
    ['gdOffset 0', { gdOffset: 0n }, 'gdOffset'],
    ['gdOffset past EOF', { gdOffset: BigInt(size / 512) }, 'gdOffset'],
    ['gdOffset beyond 32 bits', { gdOffset: 1n << 40n }, 'gdOffset'],
    ['rgdOffset past EOF', { rgdOffset: BigInt(size / 512 + 1) }, 'rgdOffset'],
    ['descriptorOffset past EOF', { descriptorOffset: 1n << 30n }, 'descriptorOffset'],
    ['descriptorSize over 1 MiB', { descriptorSize: 1n << 20n }, 'descriptorSize'],
    ['newline check bytes', { doubleEndLineChar1: 0x0a }, 'newline check bytes'],
  ];
  for (const [name, patch, field] of bad) {
    it(`${name} → FormatError on ${field}`, async () => {
      expect(() => validateSparseHeader({ ...h, ...patch }, size)).toThrow(FormatError);
      try {
        validateSparseHeader({ ...h, ...patch }, size);
      } catch (e) {
        expect((e as FormatError).field).toBe(field);
      }
      if (field !== 'magic') {
        const err = await errorOf(readAll(withHeader(sparse, patch)));
        expect(err).toBeInstanceOf(FormatError);
        expect((err as FormatError).field).toBe(field);
      }
    });
  }
  const unsupported: [string, Partial<SparseExtentHeader>][] = [
    ['version 4', { version: 4 }],
    ['compressAlgorithm 2', { compressAlgorithm: 2 }],
    ['compressed grains without markers', { compressAlgorithm: 1, flags: 1 }],
    ['capacity 0 with a descriptor (extent list inside a sparse file)', { capacity: 0n }],
  ];
  for (const [name, patch] of unsupported) {
    it(`${name} → UnsupportedError`, async () => {
      expect(await errorOf(readAll(withHeader(sparse, patch)))).toBeInstanceOf(UnsupportedError);
    });
  }
  it('a bad embedded descriptor names its line', async () => {
    const x = sparse.bytes.slice();
    x.set(Buffer.from('version=1\nCID=1\nparentCID=ffffffff\n!!! garbage\n\0'), 512);
    const err = await errorOf(readAll(x));
    expect((err as FormatError).field).toBe('descriptor line 4');
  });
  it('GD_AT_END footer: marker, magic, EOS and length are checked', async () => {
    const b = vmwareStream;
    const at = b.footerAt!;
    const cases: [Uint8Array, string][] = [
      [u32At(b.bytes, at + 12, 7), 'footer marker'],
      [u32At(b.bytes, at + 512, 0), 'footer magic'],
      [u32At(b.bytes, at + 1024 + 12, 3), 'end-of-stream marker'],
      [b.bytes.slice(0, 1536), 'gdOffset'],
    ];
    for (const [bytes, field] of cases) {
      const err = await errorOf(readAll(bytes));
      expect((err as FormatError).field).toBe(field);
    }
    // A footer that itself says GD_AT_END.
    const x = b.bytes.slice();
    x.set(encodeSparseHeader({ ...decodeSparseHeader(x.subarray(at + 512)), gdOffset: GD_AT_END }), at + 512);
    expect(((await errorOf(readAll(x))) as FormatError).field).toBe('gdOffset');
  });
  it('COWD (VMDK3) is refused as unsupported', async () => {
    const x = new Uint8Array(4096);
    x.set(Buffer.from('COWD'));
    expect(await errorOf(readAll(x))).toBeInstanceOf(UnsupportedError);
  });
});

describe('table entries are validated; check() counts what mapping() refuses', () => {
  const gdEntry = (b: Built, i: number) => b.gdOffset + i * 4;
  const gte = (b: Built, gt: number, i: number) => b.gtOffsets[gt]! + i * 4;
  const cases: [string, () => Uint8Array, string][] = [
    ['GD entry past EOF', () => u32At(sparse.bytes, gdEntry(sparse, 0), sparse.bytes.length / 512), 'grain directory entry 0'],
    ['GD entry with a GT straddling EOF', () => u32At(sparse.bytes, gdEntry(sparse, 0), sparse.bytes.length / 512 - 1), 'grain directory entry 0'],
    ['two GD entries sharing a GT', () => u32At(sparse.bytes, gdEntry(sparse, 1), sparse.gtOffsets[0]! / 512), 'grain directory entry 1'],
    ['GTE past EOF', () => u32At(sparse.bytes, gte(sparse, 0, 3), 0xfffffff0), 'grain table entry 0/3'],
    ['GTE onto the grain directory', () => u32At(sparse.bytes, gte(sparse, 0, 3), sparse.gdOffset / 512), 'ok-for-mapping'],
    ['grain marker size 0', () => u32At(stream.bytes, stream.grainOffsets.get(3)! + 8, 0), 'grain marker size (grain table entry 0/3)'],
    ['grain marker size beyond two grains', () => u32At(stream.bytes, stream.grainOffsets.get(3)! + 8, 3 * G), 'grain marker size (grain table entry 0/3)'],
    ['compressed grain past EOF', () => u32At(stream.bytes, stream.grainOffsets.get(700)! + 8, 2 * G - 12), 'grain marker size (grain table entry 1/188)'],
  ];
  for (const [name, make, field] of cases) {
    it(name, async () => {
      const bytes = make();
      const chain = await openMem({ '/m/a.vmdk': bytes }, '/m/a.vmdk', 'vmdk');
      const img = chain.layers[0]!;
      if (field === 'ok-for-mapping') {
        // A grain over the GD: the mapping is well-formed; hostSpace (overlap) is not.
        await img.mapping();
        const err = await errorOf(img.hostSpace());
        expect(err).toBeInstanceOf(FormatError);
      } else {
        const err = await errorOf(img.mapping());
        expect(err).toBeInstanceOf(FormatError);
        expect((err as FormatError).field).toBe(field);
        expect(await errorOf(img.hostSpace())).toBeInstanceOf(FormatError);
      }
      const r = await img.check();
      expect(r.corruptions).toBeGreaterThan(0);
      expect(r.messages.length).toBe(r.corruptions);
      const r2 = await checkImage(img);
      expect(r2.corruptions).toBeGreaterThan(0);
      // After check, mapping still refuses the same way.
      if (field !== 'ok-for-mapping') expect(await errorOf(img.mapping())).toBeInstanceOf(FormatError);
    });
  }
  it('a GTE of 1 without the zeroed-grain flag is a grain at sector 1 (over the descriptor)', async () => {
    const noZero = withHeader(sparse, { flags: decodeSparseHeader(sparse.bytes).flags & ~4 });
    const chain = await openMem({ '/m/a.vmdk': noZero }, '/m/a.vmdk', 'vmdk');
    const m = (await chain.layers[0]!.mapping()).toArray();
    expect(m.find((e) => e.guest === 5 * G)).toMatchObject({ kind: 'data', host: 512 });
    expect(await errorOf(chain.layers[0]!.hostSpace())).toBeInstanceOf(FormatError);
  });
  it('a marker whose LBA disagrees with its GTE is a check() corruption', async () => {
    const x = stream.bytes.slice();
    x.set(encodeGrainMarker({ lba: 999n, size: new DataView(x.buffer).getUint32(stream.grainOffsets.get(3)! + 8, true) }), stream.grainOffsets.get(3)!);
    const chain = await openMem({ '/m/a.vmdk': x }, '/m/a.vmdk', 'vmdk');
    const r = await chain.layers[0]!.check();
    expect(r.corruptions).toBe(1);
    expect(r.messages[0]).toContain('LBA 999');
  });
  it('a compressed grain that does not inflate is a FormatError on read', async () => {
    const x = stream.bytes.slice();
    x.fill(0x55, stream.grainOffsets.get(3)! + 12, stream.grainOffsets.get(3)! + 40);
    const chain = await openMem({ '/m/a.vmdk': x }, '/m/a.vmdk', 'vmdk');
    const e = (await chain.layers[0]!.mapping()).toArray().find((x) => x.guest === 3 * G)!;
    const err = await errorOf((chain.layers[0]! as SparseImage).readCompressed(e));
    expect((err as FormatError).field).toBe('compressed grain');
  });
});

describe('descriptor files', () => {
  const desc = (over: Partial<Descriptor>): Uint8Array =>
    Buffer.from(
      encodeDescriptor({
        version: 1,
        cid: 0x1234,
        parentCid: 0xffffffff,
        createType: 'monolithicFlat',
        extents: [{ access: 'RW', sectors: 16, type: 'FLAT', file: 'd-flat.vmdk', offset: 2 }],
        ddb: [['ddb.adapterType', 'lsilogic']],
        other: [],
        ...over,
      }),
    );
  const flat = new Uint8Array(18 * 512);
  flat.set(pattern(8 * 512, 5), 2 * 512);

  it('reads a FLAT extent with an offset', async () => {
    const chain = await openMem({ '/m/a.vmdk': desc({}), '/m/d-flat.vmdk': flat });
    const img = chain.layers[0]!;
    expect(img.info.virtualSize).toBe(16 * 512);
    expect(img.dataFile).toBe('d-flat.vmdk');
    expect(img.info.details['adapter-type']).toBe('lsilogic');
    const m = (await img.mapping()).toArray();
    expect(m.every((e) => e.host === undefined || e.host === e.guest + 1024)).toBe(true);
    expect(await (await GuestReader.create(chain)).read(0, 8 * 512)).toEqual(pattern(8 * 512, 5));
    expect((await img.check()).corruptions).toBe(0);
  });
  it('a flat file shorter than the extent reads zeros past its end; an offset past its end is a check() corruption', async () => {
    const chain = await openMem({ '/m/a.vmdk': desc({ extents: [{ access: 'RW', sectors: 64, type: 'FLAT', file: 'd-flat.vmdk', offset: 2 }] }), '/m/d-flat.vmdk': flat });
    const m = (await chain.layers[0]!.mapping()).toArray();
    expect(m[m.length - 1]).toMatchObject({ kind: 'zero' });
    expect(m[m.length - 1]!.host).toBeUndefined();
    const past = await openMem({ '/m/a.vmdk': desc({ extents: [{ access: 'RW', sectors: 8, type: 'FLAT', file: 'd-flat.vmdk', offset: 100 }] }), '/m/d-flat.vmdk': flat });
    expect((await past.layers[0]!.check()).corruptions).toBe(1);
  });
  const refusals: [string, Partial<Descriptor>, typeof FormatError | typeof UnsupportedError, string | RegExp][] = [
    ['FLAT without offset', { extents: [{ access: 'RW', sectors: 16, type: 'FLAT', file: 'd-flat.vmdk' }] }, FormatError, 'extent offset'],
    ['no extent', { extents: [] }, FormatError, 'descriptor extents'],
    ['zero-sector extent', { extents: [{ access: 'RW', sectors: 0, type: 'FLAT', file: 'd-flat.vmdk', offset: 0 }] }, FormatError, 'extent sectors'],
    ['two extents', { createType: 'twoGbMaxExtentFlat', extents: [{ access: 'RW', sectors: 8, type: 'FLAT', file: 'd-flat.vmdk', offset: 0 }, { access: 'RW', sectors: 8, type: 'FLAT', file: 'd-flat.vmdk', offset: 8 }] }, UnsupportedError, /twoGbMaxExtentFlat.*2 extents.*qemu-img convert/],
    ['RDONLY extent', { extents: [{ access: 'RDONLY', sectors: 16, type: 'FLAT', file: 'd-flat.vmdk', offset: 0 }] }, UnsupportedError, /RDONLY/],
    ['seSparse', { createType: 'seSparse', extents: [{ access: 'RW', sectors: 16, type: 'SESPARSE', file: 'd-flat.vmdk' }] }, UnsupportedError, /seSparse/],
    ['vmfsSparse', { createType: 'vmfsSparse', extents: [{ access: 'RW', sectors: 16, type: 'VMFSSPARSE', file: 'd-flat.vmdk' }] }, UnsupportedError, /vmfsSparse/],
    ['an unknown createType', { createType: 'fullDevice' }, UnsupportedError, /fullDevice/],
    ['monolithicSparse as a descriptor file', { createType: 'monolithicSparse' }, FormatError, 'createType'],
  ];
  for (const [name, over, cls, what] of refusals) {
    it(`refuses ${name}`, async () => {
      const err = await errorOf(openMem({ '/m/a.vmdk': desc(over), '/m/d-flat.vmdk': flat }));
      expect(err).toBeInstanceOf(cls);
      if (typeof what === 'string') expect((err as FormatError).field).toBe(what);
      else expect((err as Error).message).toMatch(what);
    });
  }
  it('a binary file forced to -f vmdk fails with a FormatError', async () => {
    const err = await errorOf(openMem({ '/m/a.vmdk': pattern(4096, 3) }, '/m/a.vmdk', 'vmdk'));
    expect(err).toBeInstanceOf(FormatError);
  });
});

describe('mutation fuzz', () => {
  const bases: [string, Uint8Array, number][] = [
    // [name, bytes, how many leading bytes hold header/descriptor/tables worth mutating]
    ['sparse', sparse.bytes, sparse.bytes.length],
    ['stream', stream.bytes, stream.bytes.length],
    ['vmware stream', vmwareStream.bytes, vmwareStream.bytes.length],
  ];
  const structuredOffsets = (b: Built): number[] => {
    const out = [0, 4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 73, 77, b.gdOffset, ...b.gtOffsets];
    if (b.rgdOffset !== undefined) out.push(b.rgdOffset);
    for (const o of b.grainOffsets.values()) out.push(o, o + 8);
    if (b.footerAt !== undefined) out.push(b.footerAt, b.footerAt + 12, b.footerAt + 512 + 56, b.footerAt + 512 + 12);
    return out;
  };
  const builtOf = [sparse, stream, vmwareStream];
  const mutation = fc.record({
    base: fc.integer({ min: 0, max: 2 }),
    edits: fc.array(
      fc.record({
        kind: fc.constantFrom('byte', 'field32', 'field64'),
        where: fc.nat(),
        structured: fc.boolean(),
        value: fc.oneof(fc.constantFrom(0, 1, 0xffffffff, 0x7fffffff, 512, 21), fc.nat({ max: 0xffffffff })),
      }),
      { minLength: 1, maxLength: 6 },
    ),
  });

  test.prop([mutation], { numRuns: 300 })('open+mapping+hostSpace+check+read never fail outside ImgconvError and never write', async (m) => {
    const [, base, len] = bases[m.base]!;
    const built = builtOf[m.base]!;
    const x = base.slice();
    const dv = new DataView(x.buffer);
    const offs = structuredOffsets(built);
    for (const e of m.edits) {
      const at = e.structured ? offs[e.where % offs.length]! + (e.kind === 'byte' ? e.where % 4 : 0) : e.where % len;
      if (e.kind === 'byte' && at < x.length) x[at] = e.value & 0xff;
      else if (e.kind === 'field32' && at + 4 <= x.length) dv.setUint32(at, e.value, true);
      else if (e.kind === 'field64' && at + 8 <= x.length) dv.setBigUint64(at, BigInt(e.value) * BigInt(e.value % 7 === 0 ? 0x100000000 : 1), true);
    }
    const started = Date.now();
    try {
      const chain = await openMem({ '/m/a.vmdk': x }, '/m/a.vmdk', 'vmdk');
      const img = chain.layers[0]!;
      const report = await img.check();
      expect(report.messages.length).toBe(report.corruptions);
      await checkImage(img);
      const map = await img.mapping();
      await img.hostSpace();
      if (img.info.virtualSize <= 64 << 20) {
        const r = await GuestReader.create(chain);
        for (const e of map) await r.read(e.guest, Math.min(e.length, 2 * G));
      }
      await chain.close();
    } catch (e) {
      if (!(e instanceof ImgconvError)) throw e;
    }
    expect(Date.now() - started).toBeLessThan(5000);
  });
});

describe('descriptor-file fuzz', () => {
  const text = encodeDescriptor({
    version: 1,
    cid: 0x1234,
    parentCid: 0xffffffff,
    createType: 'monolithicFlat',
    extents: [{ access: 'RW', sectors: 16, type: 'FLAT', file: 'd-flat.vmdk', offset: 2 }],
    ddb: [['ddb.adapterType', 'ide']],
    other: [],
  });
  const flat = pattern(18 * 512, 6);
  test.prop([fc.array(fc.record({ at: fc.nat(), s: fc.string({ maxLength: 12 }), del: fc.nat({ max: 12 }) }), { minLength: 1, maxLength: 5 })], { numRuns: 200 })(
    'edited descriptor text opens or fails with an ImgconvError',
    async (edits) => {
      let t = text;
      for (const e of edits) {
        const at = e.at % (t.length + 1);
        t = t.slice(0, at) + e.s + t.slice(at + e.del);
      }
      try {
        const chain = await openMem({ '/m/a.vmdk': Buffer.from(t), '/m/d-flat.vmdk': flat }, '/m/a.vmdk', 'vmdk');
        const img = chain.layers[0]!;
        await img.mapping();
        await img.hostSpace();
        await img.check();
        await (await GuestReader.create(chain)).sha256();
        await chain.close();
      } catch (e) {
        if (!(e instanceof ImgconvError)) throw e;
      }
    },
  );
});
