/**
 * unstream against bad input, in-process: damaged streams (random bytes flipped in the headers or
 * anywhere) either read into a destination that opens, or are refused with an ImgconvError — never
 * an internal error — and then no destination is left; a qcow2 whose L1 table was moved behind its L2
 * tables (by qemu-img resize) is refused as out of order before the destination exists; an aborted
 * unstream removes what it wrote.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { allDrivers } from '../../drivers/index.js';
import { ImgconvError } from '../../src/errors.js';
import { DataRuns } from '../../src/stream/collapse.js';
import { StreamInterruptedError } from '../../src/stream/export.js';
import { unstreamImage } from '../../src/stream/import.js';
import type { GuestSource, StreamSink } from '../../src/stream/types.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';

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

async function* chunks(bytes: Uint8Array, size = 65536): AsyncIterable<Uint8Array> {
  for (let at = 0; at < bytes.length; at += size) yield bytes.subarray(at, at + size);
}

/** A 3 MiB guest with data in three places, streamed as `to`. */
async function streamOf(to: string): Promise<Uint8Array> {
  const vs = 3 << 20;
  const guest = new Uint8Array(vs);
  const runs = new DataRuns(vs, [
    [0, 70_000 - (70_000 % 512)],
    [1 << 20, (1 << 20) + 4096],
    [vs - 8192, vs],
  ]);
  for (const [a, b] of runs) for (let i = a; i < b; i++) guest[i] = (i * 7 + 3) & 0xff;
  const source: GuestSource = {
    async read(o, n) {
      const out = new Uint8Array(n);
      out.set(guest.subarray(Math.min(vs, o), Math.min(vs, o + n)));
      return out;
    },
  };
  const layout = allDrivers.find((d) => d.name === to)!.stream!.layout({ virtualSize: vs, data: runs, options: {}, fileName: 'x' });
  const sink = new MemorySink();
  await layout.write(source, sink);
  return sink.bytes();
}

describe('unstream against damaged and hostile streams', () => {
  const tmp = withTmpDir('imgconv-unstream-');
  let n = 0;
  afterAll(() => tmp.cleanup());

  for (const from of ['qcow2', 'vhd', 'vmdk']) {
    let good: Uint8Array;
    beforeAll(async () => {
      good = await streamOf(from);
    });
    // Flips in the first sectors (headers) or anywhere (tables, markers, footers, data).
    const flipArb = fc.tuple(fc.oneof(fc.nat({ max: 2047 }), fc.nat({ max: 2 ** 30 })), fc.integer({ min: 1, max: 255 }));
    test.prop([fc.array(flipArb, { minLength: 1, maxLength: 8 }), fc.constantFrom('raw', from)], { numRuns: 60 })(
      `${from}: a damaged stream is read or refused with a clear error, never half-written`,
      async (flips, to) => {
        const bad = good.slice();
        for (const [at, x] of flips) bad[at % bad.length] = bad[at % bad.length]! ^ x;
        const dest = tmp.path(`d${n++}.${to}`);
        try {
          const r = await unstreamImage(chunks(bad), dest, { from, to, drivers: allDrivers });
          expect(existsSync(dest)).toBe(true);
          expect(r.virtualSize).toBeGreaterThan(0);
        } catch (e) {
          if (!(e instanceof ImgconvError)) throw e;
          expect(existsSync(dest)).toBe(false);
          expect(existsSync(`${dest}.imgconv-journal`)).toBe(false);
        }
      },
    );
  }

  it('an aborted unstream removes the destination', async () => {
    const ac = new AbortController();
    const dest = tmp.path('aborted.raw');
    const stream = await streamOf('qcow2');
    const p = unstreamImage(chunks(stream, 4096), dest, {
      from: 'qcow2',
      to: 'raw',
      drivers: allDrivers,
      signal: ac.signal,
      onProgress: (e) => {
        if (e.phase === 'write' && e.bytesDone > 0) ac.abort();
      },
    });
    await expect(p).rejects.toThrow(StreamInterruptedError);
    expect(existsSync(dest)).toBe(false);
  });
});

describe.skipIf(!qemuAvailable())('unstream: QEMU files out of stream order', () => {
  const tmp = withTmpDir('imgconv-unstream-q-');
  afterAll(() => tmp.cleanup());

  it('a qcow2 whose L1 table moved behind its L2 tables and data (qemu-img resize) is refused before the destination exists', async () => {
    const img = tmp.path('moved.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', img], { stdio: 'ignore' });
    // 64 KiB clusters: one L1 entry maps 512 MiB, so 1 GiB needs a larger L1, written at the end.
    execFileSync('qemu-img', ['resize', '-q', img, '1G']);
    const dest = tmp.path('moved.raw');
    await expect(unstreamImage(chunks(readFileSync(img)), dest, { from: 'qcow2', to: 'raw', drivers: allDrivers })).rejects.toThrow(/stream order/);
    expect(existsSync(dest)).toBe(false);
  });
});
