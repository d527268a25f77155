/**
 * Streaming's pieces without qemu: the collapsed chain view, the tar header (encode/decode round
 * trip), the qcow2 refcount fixed point, the VHD size rule, the sinks and the stream inputs, and —
 * for every stream format — write then read back in memory: the reader gives back exactly the guest
 * bytes, and the layout's size (or the counted size) is the number of bytes written.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, writeSync, ftruncateSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { qcow2StreamCounts } from '../../drivers/qcow2/stream.js';
import { streamGeometry } from '../../drivers/vhd/stream.js';
import { virtualSectors, VHD_MAX_SECTORS } from '../../drivers/vhd/geometry.js';
import { ExtentMap, type ExtentKind } from '../../src/extent-map.js';
import { FormatError } from '../../src/errors.js';
import { DataRuns } from '../../src/stream/collapse.js';
import { isAllZero, ReadableInput, StreamDevice } from '../../src/stream/input.js';
import { CoalescingSink, CountingSink } from '../../src/stream/sink.js';
import { decodeTarHeader, tarHeader, tarLength, tarTrailerLength, TAR_BLOCK } from '../../src/stream/tar.js';
import type { GuestSource, StreamSink } from '../../src/stream/types.js';
import { withTmpDir } from '../support/qemu.js';

const SECTOR = 512;

/** A sink that keeps everything (small test images only). */
class MemorySink implements StreamSink {
  private parts: Uint8Array[] = [];
  position = 0;
  async write(bytes: Uint8Array): Promise<void> {
    this.parts.push(bytes.slice());
    this.position += bytes.length;
  }
  async zeros(length: number): Promise<void> {
    this.parts.push(new Uint8Array(length));
    this.position += length;
  }
  bytes(): Uint8Array {
    return Buffer.concat(this.parts);
  }
}

async function* chunked(bytes: Uint8Array, sizes: number[]): AsyncIterable<Uint8Array> {
  let at = 0;
  let i = 0;
  while (at < bytes.length) {
    const n = Math.max(1, sizes[i++ % sizes.length]!);
    yield bytes.subarray(at, at + n);
    at += n;
  }
}

// ---------------------------------------------------------------------------------------------------

describe('DataRuns', () => {
  const kinds: ExtentKind[] = ['data', 'zero', 'unallocated', 'compressed'];
  /** A layer as one kind per sector. */
  const layerArb = (sectors: number) => fc.array(fc.constantFrom(...kinds), { minLength: sectors, maxLength: sectors });

  function mapOf(perSector: ExtentKind[]): ExtentMap {
    const m = new ExtentMap(perSector.length * SECTOR);
    perSector.forEach((k, i) =>
      m.push({ guest: i * SECTOR, length: SECTOR, kind: k, ...(k === 'data' ? { host: i * SECTOR } : k === 'compressed' ? { host: 7, hostLength: 100 } : {}) }),
    );
    return m;
  }

  test.prop([fc.integer({ min: 1, max: 40 }).chain((n) => fc.tuple(fc.constant(n), fc.array(fc.integer({ min: 1, max: 48 }), { minLength: 0, maxLength: 2 })))
    .chain(([n, backs]) => fc.tuple(layerArb(n), ...backs.map((b) => layerArb(b))))])('fromChain: a sector has data iff the first layer that is not unallocated has data there', (layers) => {
    const maps = layers.map(mapOf);
    const runs = DataRuns.fromChain(maps);
    const n = layers[0]!.length;
    const expected: boolean[] = [];
    for (let s = 0; s < n; s++) {
      let data = false;
      for (const l of layers) {
        const k = s < l.length ? l[s]! : 'zero'; // past a shorter backing file: zeros
        if (k === 'unallocated') continue;
        data = k === 'data' || k === 'compressed';
        break;
      }
      expected.push(data);
    }
    const got = new Array<boolean>(n).fill(false);
    let prevEnd = -1;
    for (const [a, b] of runs) {
      expect(a).toBeGreaterThan(prevEnd); // disjoint and never adjacent
      prevEnd = b;
      for (let x = a; x < b; x += SECTOR) got[x / SECTOR] = true;
    }
    expect(got).toEqual(expected);
    expect(runs.bytes).toBe(expected.filter(Boolean).length * SECTOR);
    // Units of 4 sectors: exactly those holding a data sector.
    const u = runs.units(4 * SECTOR);
    const units = new Set<number>();
    for (let i = 0; i < u.ranges.length; i += 2) for (let x = u.ranges[i]!; x < u.ranges[i + 1]!; x++) units.add(x);
    const want = new Set(expected.flatMap((d, s) => (d ? [Math.floor(s / 4)] : [])));
    expect(units).toEqual(want);
    expect(u.count).toBe(want.size);
  });
});

// ---------------------------------------------------------------------------------------------------

describe('tar header', () => {
  const nameArb = fc.oneof(
    fc.stringMatching(/^[A-Za-z0-9._-]{1,40}$/),
    fc.stringMatching(/^[A-Za-z0-9._-]{101,180}$/),
    fc.stringMatching(/^[a-z]{1,8}$/).map((s) => `dïsk-${s}.vmdk`),
    fc.tuple(fc.stringMatching(/^[a-z]{1,10}$/), fc.stringMatching(/^[a-z]{1,10}$/)).map(([a, b]) => `${a}/${b}.vmdk`),
  );
  test.prop([nameArb, fc.oneof(fc.integer({ min: 0, max: 2 ** 33 }), fc.integer({ min: 2 ** 33, max: 2 ** 50 })), fc.integer({ min: 0, max: 2 ** 33 - 1 })])(
    'decode(encode(name, size, mtime)) gives them back, in whole blocks',
    (name, size, mtime) => {
      const h = tarHeader(name, size, mtime);
      expect(h.length % TAR_BLOCK).toBe(0);
      const m = decodeTarHeader(h);
      expect(m).toEqual({ name, size, mtime, headerLength: h.length });
      expect(tarLength(name, size)).toBe(h.length + size + tarTrailerLength(size));
      expect((size + tarTrailerLength(size)) % TAR_BLOCK).toBe(0);
      expect(tarTrailerLength(size)).toBeGreaterThanOrEqual(2 * TAR_BLOCK);
    },
  );

  it('a damaged checksum is refused by the decoder', () => {
    const h = tarHeader('disk.vmdk', 1000, 0);
    h[10] = 0x41;
    expect(() => decodeTarHeader(h)).toThrow(FormatError);
  });

  it('refuses member names that would not extract beside the others', () => {
    for (const bad of ['', '/abs.vmdk', '../up.vmdk', 'a//b', 'a/']) expect(() => tarHeader(bad, 0)).toThrow(/member name/);
  });

  it('GNU tar lists a 9 GiB member with a long name (pax size and path), the archive being sparse', () => {
    const tmp = withTmpDir('imgconv-tar-');
    try {
      const name = `${'x'.repeat(120)}.vmdk`;
      const size = 9 * 2 ** 30 + 123;
      const file = tmp.path('big.tar');
      const fd = openSync(file, 'w');
      const h = tarHeader(name, size, 1_700_000_000);
      writeSync(fd, h);
      ftruncateSync(fd, h.length + size + tarTrailerLength(size));
      closeSync(fd);
      const listing = execFileSync('tar', ['-tvf', file], { encoding: 'utf8' });
      expect(listing).toContain(String(size));
      expect(listing).toContain(name);
    } finally {
      tmp.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------------

describe('qcow2 stream refcounts', () => {
  test.prop([
    fc.constantFrom(512, 4096, 65536, 2 << 20),
    fc.integer({ min: 0, max: 6 }),
    fc.integer({ min: 1, max: 5000 }),
    fc.integer({ min: 0, max: 5000 }),
    fc.integer({ min: 0, max: 10_000_000 }),
  ])('cover every cluster of the file, themselves included, with no refblock to spare', (cs, order, l1Entries, l2, data) => {
    const c = qcow2StreamCounts(cs, order, l1Entries, l2, data);
    const perBlock = (cs * 8) / (1 << order);
    expect(c.total).toBe(1 + c.reftableClusters + c.refblocks + c.l1Clusters + c.l2Tables + c.dataClusters);
    expect(c.refblocks * perBlock).toBeGreaterThanOrEqual(c.total);
    expect((c.refblocks - 1) * perBlock).toBeLessThan(c.total);
    expect(c.reftableClusters * (cs / 8)).toBeGreaterThanOrEqual(c.refblocks);
    expect((c.reftableClusters - 1) * (cs / 8)).toBeLessThan(c.refblocks);
  });
});

describe('VHD stream size', () => {
  test.prop([fc.integer({ min: 1, max: VHD_MAX_SECTORS })])('every QEMU reads back the exact size (geometry when exact, else the maximum)', (sectors) => {
    const vs = sectors * 512;
    const g = streamGeometry(vs);
    expect(virtualSectors('imgc', g, BigInt(vs))).toBe(BigInt(sectors));
  });
});

// ---------------------------------------------------------------------------------------------------

describe('sinks and inputs', () => {
  const opArb = fc.oneof(
    fc.uint8Array({ minLength: 0, maxLength: 700 }).map((b) => ({ write: b })),
    fc.integer({ min: 0, max: 900 }).map((n) => ({ zeros: n })),
  );
  test.prop([fc.array(opArb, { maxLength: 40 }), fc.constantFrom(64, 256, 1024)])('CoalescingSink hands on exactly the concatenation, in order', async (ops, chunk) => {
    const inner = new MemorySink();
    const sink = new CoalescingSink(inner, chunk);
    const expected: number[] = [];
    for (const op of ops) {
      if ('write' in op) {
        await sink.write(op.write);
        expected.push(...op.write);
      } else {
        await sink.zeros(op.zeros);
        for (let i = 0; i < op.zeros; i++) expected.push(0);
      }
      expect(sink.position).toBe(expected.length);
    }
    await sink.flush();
    expect([...inner.bytes()]).toEqual(expected);
  });

  test.prop([fc.uint8Array({ minLength: 1, maxLength: 3000 }), fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 6 }), fc.array(fc.nat({ max: 400 }), { maxLength: 8 })])(
    'ReadableInput reads, skips and drains any chunking of a stream, and the tap sees every byte once',
    async (bytes, sizes, steps) => {
      const input = new ReadableInput(chunked(bytes, sizes), 'test stream');
      const tapped: number[] = [];
      input.tap = async (offset, b) => {
        expect(offset).toBe(tapped.length);
        tapped.push(...b);
      };
      let at = 0;
      for (const [i, n] of steps.entries()) {
        if (at + n > bytes.length) {
          await expect(input.read(n, 'x')).rejects.toThrow(FormatError);
          at = bytes.length;
          break;
        }
        if (i % 2) await input.skip(n, 'x');
        else expect([...(await input.read(n, 'x'))]).toEqual([...bytes.subarray(at, at + n)]);
        at += n;
        expect(input.position).toBe(at);
      }
      await input.drain();
      expect(input.position).toBe(bytes.length);
      expect(tapped).toEqual([...bytes]);
    },
  );

  it('StreamDevice serves ascending reads, keeps them, and refuses bytes the stream skipped', async () => {
    const bytes = new Uint8Array(4096).map((_, i) => i % 251);
    const dev = new StreamDevice(new ReadableInput(chunked(bytes, [100, 37]), 'test stream'), 'test', 'test');
    const a = new Uint8Array(200);
    await dev.read(a, 1000);
    expect([...a]).toEqual([...bytes.subarray(1000, 1200)]);
    const again = new Uint8Array(50);
    await dev.read(again, 1100); // kept
    expect([...again]).toEqual([...bytes.subarray(1100, 1150)]);
    await expect(dev.read(new Uint8Array(10), 500)).rejects.toThrow(/not written in stream order/);
    const tail = new Uint8Array(200);
    expect(await dev.read(tail, 4000)).toBe(96); // short at the end of the stream
  });

  it('isAllZero', () => {
    expect(isAllZero(new Uint8Array(3 << 20))).toBe(true);
    const b = new Uint8Array((1 << 20) + 5);
    b[(1 << 20) + 4] = 1;
    expect(isAllZero(b)).toBe(false);
    expect(isAllZero(b.subarray(0, 1 << 20))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------------

describe('write then read back, in memory, every stream format', () => {
  const formats: [string, Record<string, string>][] = [
    ['raw', {}],
    ['qcow2', {}],
    ['qcow2', { cluster_size: '4096', refcount_bits: '1' }],
    ['qcow2', { compat: '0.10', cluster_size: '512' }],
    ['vhd', {}],
    ['vhd', { subformat: 'fixed' }],
    ['vmdk', {}],
  ];
  /** A guest of up to 6 MiB with a few data runs (some all-zero), as sector ranges. */
  const guestArb = fc
    .integer({ min: 1, max: 12_288 })
    .chain((sectors) =>
      fc.tuple(
        fc.constant(sectors),
        fc.array(fc.tuple(fc.nat({ max: sectors - 1 }), fc.integer({ min: 1, max: 600 }), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
      ),
    );

  for (const [to, options] of formats) {
    const label = `${to}${Object.keys(options).length ? ` (${Object.entries(options).map(([k, v]) => `${k}=${v}`).join(',')})` : ''}`;
    test.prop([guestArb], { numRuns: 12 })(`${label}: the reader gives back the guest; the size is what was written`, async ([sectors, writes]) => {
      const vs = sectors * SECTOR;
      const guest = new Uint8Array(vs);
      const marks = new Uint8Array(sectors);
      for (const [s, n, fill] of writes) {
        const end = Math.min(sectors, s + n);
        for (let x = s; x < end; x++) {
          marks[x] = 1;
          // Distinct bytes per sector; fill 0 leaves an all-zero data run.
          if (fill) guest.fill(fill ^ (x & 0xff), x * SECTOR, (x + 1) * SECTOR);
        }
      }
      const runs = new DataRuns(vs);
      for (let x = 0; x < sectors; ) {
        if (!marks[x]) {
          x++;
          continue;
        }
        let e = x;
        while (e < sectors && marks[e]) e++;
        runs.add(x * SECTOR, e * SECTOR);
        x = e;
      }
      const source: GuestSource = {
        async read(offset, length) {
          const out = new Uint8Array(length);
          out.set(guest.subarray(Math.min(vs, offset), Math.min(vs, offset + length)));
          return out;
        },
      };
      const driver = allDrivers.find((d) => d.name === to)!;
      const layout = driver.stream!.layout({ virtualSize: vs, data: runs, options, fileName: 'disk' });
      const sink = new MemorySink();
      await layout.write(source, sink);
      const stream = sink.bytes();
      const counted = new CountingSink();
      await layout.write(source, counted);
      expect(counted.position).toBe(stream.length);
      if (layout.size !== undefined) expect(stream.length).toBe(layout.size);
      expect(stream.length).toBeLessThanOrEqual(layout.fullyAllocated);

      const input = new ReadableInput(chunked(stream, [65536, 1000, 7]), `${to} stream`);
      const head = await driver.stream!.reader!.readHead(input);
      const back = new Uint8Array(vs);
      const got = await head.readData(input, async (g, b) => {
        expect(g + b.length).toBeLessThanOrEqual(Math.max(vs, g + b.length));
        back.set(b.subarray(0, Math.max(0, Math.min(b.length, vs - g))), g);
      });
      expect(got).toBe(vs);
      expect(Buffer.from(back).equals(Buffer.from(guest))).toBe(true);
    });
  }
});
