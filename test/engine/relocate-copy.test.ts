/**
 * The relocation rounds' copy path (src/blockdev/copy.ts, relocate.ts executeRelocation): destinations
 * are free space that may hold stale bytes (an old place of the round before is not punched when the
 * next round copies into it), so every all-zero block of a copy must be punched there, not skipped;
 * past the end of the file nothing needs punching, and the file still ends at the copy's end.
 */
import { describe, expect, it } from 'vitest';
import { FreeSpaceCopier, gatherRuns } from '../../src/blockdev/copy.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import { executeRelocation, type RelocationPlan, type Unit } from '../../src/engine/relocate.js';

const K = 1024;

function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 31 + seed * 7) % 251) + 1;
  return b;
}

/** Every call that changes the device, in order; and how many operations are in flight. */
function watched(d: MemoryBlockDevice): { dev: BlockDevice; ops: string[]; inFlight: () => number } {
  const ops: string[] = [];
  let running = 0;
  const track =
    <A extends unknown[], R>(name: string, f: (...a: A) => Promise<R>) =>
    async (...a: A): Promise<R> => {
      running++;
      if (name !== 'read' && name !== 'size') ops.push(`${name} ${String(a[name === 'write' ? 1 : 0])}`);
      try {
        await new Promise((r) => setImmediate(r));
        return await f(...a);
      } finally {
        running--;
      }
    };
  const dev: BlockDevice = {
    path: d.path,
    writable: true,
    size: track('size', () => d.size()),
    allocated: () => d.allocated(),
    read: track('read', (b: Uint8Array, o: number) => d.read(b, o)),
    write: track('write', (b: Uint8Array, o: number) => d.write(b, o)),
    flush: track('flush', () => d.flush()),
    truncate: track('truncate', (n: number) => d.truncate(n)),
    punchHole: track('punch', (o: number, n: number) => d.punchHole(o, n)),
    nextData: (o) => d.nextData(o),
    nextHole: (o) => d.nextHole(o),
    close: () => d.close(),
  };
  return { dev, ops, inFlight: () => running };
}

describe('FreeSpaceCopier', () => {
  it('copies over stale bytes: zero blocks inside the file are punched, past its end left out, and the file reaches the copy’s end', async () => {
    // Source [0, 256K): data, a zero 64 KiB page, data, then 64 KiB of zeros at the end.
    const src = new Uint8Array(256 * K);
    src.set(pattern(64 * K, 1), 0);
    src.set(pattern(64 * K, 2), 128 * K);
    const d = new MemoryBlockDevice('img');
    await d.write(src, 0);
    // The destination [1M, 1M + 256K) holds stale bytes up to the end of the file at 1M + 160K.
    const to = 1024 * K;
    await d.write(new Uint8Array(160 * K).fill(0xee), to);
    const before = await d.allocated();
    const { dev } = watched(d);
    const copier = await FreeSpaceCopier.open(dev, 256 * K);
    await copier.copy([{ from: 0, to, length: 256 * K }], () => {});
    expect(await d.size()).toBe(to + 256 * K);
    expect(Buffer.from(await readAt(d, to, 256 * K)).equals(Buffer.from(src))).toBe(true);
    // Of the destination's four 64 KiB pages: the two with data hold it, the stale zero page inside the
    // file became a hole, and the one past the old end was never allocated.
    expect(await d.allocated()).toBe(before - 64 * K);
    expect(copier.size).toBe(to + 256 * K);
  });

  it('keeps up to two runs in flight, reuses its buffers, reports each run, and leaves nothing running when a run fails', async () => {
    const d = new MemoryBlockDevice('img');
    const runs = [0, 1, 2, 3, 4].map((k) => ({ from: k * 64 * K, to: (8 + k) * 64 * K, length: (k % 2 ? 48 : 64) * K }));
    for (const [k, r] of runs.entries()) await d.write(pattern(r.length, k + 10), r.from);
    const { dev, inFlight } = watched(d);
    const copier = await FreeSpaceCopier.open(dev, 64 * K);
    const seen: number[] = [];
    await copier.copy(runs, (n) => seen.push(n));
    expect(seen).toEqual(runs.map((r) => r.length));
    for (const [k, r] of runs.entries()) expect(Buffer.from(await readAt(d, r.to, r.length)).equals(Buffer.from(pattern(r.length, k + 10)))).toBe(true);
    // A source running past the end of the file reads zeros there, not what the buffer held before.
    const end = await d.size();
    await copier.copy([{ from: end - 16 * K, to: end + 64 * K, length: 64 * K }], () => {});
    const tail = await readAt(d, end + 64 * K, 64 * K);
    expect(Buffer.from(tail.subarray(0, 16 * K)).equals(Buffer.from(await readAt(d, end - 16 * K, 16 * K)))).toBe(true);
    expect(tail.subarray(16 * K).every((x) => x === 0)).toBe(true);

    // A write that fails while the next run is being read: the error comes out, after that read.
    const failing: BlockDevice = { ...dev, write: async () => Promise.reject(new Error('EIO (injected)')) };
    const c2 = await FreeSpaceCopier.open(failing, 64 * K);
    await expect(c2.copy(runs, () => {})).rejects.toThrow('EIO (injected)');
    expect(inFlight()).toBe(0);
    await expect(FreeSpaceCopier.open(dev, 32 * K).then((c) => c.copy(runs, () => {}))).rejects.toThrow(/exceeds/);
  });
});

describe('gathered runs', () => {
  it('gatherRuns: destinations continuing each other share a run (in destination order, at most maxBytes), continuing sources one piece', () => {
    const runs = [
      { from: 100 * K, to: 8 * K, length: 4 * K },
      { from: 0, to: 0, length: 4 * K },
      { from: 40 * K, to: 4 * K, length: 4 * K }, // source jumps, destination continues
      { from: 104 * K, to: 12 * K, length: 4 * K }, // source and destination continue
      { from: 200 * K, to: 20 * K, length: 4 * K }, // destination jumps
      { from: 204 * K, to: 24 * K, length: 0 },
    ];
    expect(gatherRuns(runs, 16 * K)).toEqual([
      { to: 0, length: 16 * K, pieces: [{ from: 0, length: 4 * K }, { from: 40 * K, length: 4 * K }, { from: 100 * K, length: 8 * K }] },
      { to: 20 * K, length: 4 * K, pieces: [{ from: 200 * K, length: 4 * K }] },
    ]);
    // The buffer bounds a run: the fourth piece starts a new one.
    expect(gatherRuns(runs, 12 * K).map((r) => [r.to, r.length])).toEqual([[0, 12 * K], [12 * K, 4 * K], [20 * K, 4 * K]]);
  });

  it('scattered 32 KiB pieces into one destination: one write per non-zero stretch, zero blocks over stale bytes punched, past-EOF sources read as zeros', async () => {
    // Eight 32 KiB pieces from 1M on, spaced 33 KiB apart (a 512-byte cluster qcow2's data between its
    // tables), the third all zeros, the last one 8 KiB of data where the file ends.
    const P = 32 * K;
    const base = 1024 * K;
    const d = new MemoryBlockDevice('img');
    const froms = [0, 1, 2, 3, 4, 5, 6, 7].map((k) => base + k * 33 * K);
    const want = new Uint8Array(8 * P);
    for (const [k, from] of froms.entries()) {
      const b = k === 2 ? new Uint8Array(P) : pattern(k === 7 ? 8 * K : P, 20 + k);
      await d.write(b, from);
      want.set(b, k * P);
      // The 1 KiB between two pieces holds a table: read with the span, never copied.
      if (k < 7) await d.write(new Uint8Array(K).fill(0xab), from + P);
    }
    const fileEnd = froms[7]! + 8 * K;
    expect(await d.size()).toBe(fileEnd);
    // The destination [0, 256K) holds stale bytes in [0, 128K) (the zero piece's place among them);
    // [512K, 768K) holds other data, copied first (a span of two pieces) so that the buffer and the
    // scratch the gathered run reuses are dirty.
    await d.write(new Uint8Array(128 * K).fill(0xee), 0);
    await d.write(pattern(256 * K, 40), 512 * K);
    const runs = froms.map((from, k) => ({ from, to: k * P, length: P }));
    const gathered = gatherRuns(runs, 256 * K);
    expect(gathered.length).toBe(1);
    const { dev: watchedDev, ops } = watched(d);
    const reads: [number, number][] = [];
    const dev: BlockDevice = { ...watchedDev, read: (b, o) => (reads.push([o, b.length]), watchedDev.read(b, o)) };
    const copier = await FreeSpaceCopier.open(dev, 256 * K);
    await copier.copy(gatherRuns([{ from: 512 * K, to: 768 * K, length: 128 * K }, { from: 641 * K, to: 896 * K, length: 127 * K }], 256 * K), () => {});
    ops.length = 0;
    reads.length = 0;
    const seen: number[] = [];
    await copier.copy(gathered, (n) => seen.push(n));
    expect(seen).toEqual([256 * K]);
    expect(Buffer.from(await readAt(d, 0, 256 * K)).equals(Buffer.from(want))).toBe(true);
    // Two writes around the zero piece's punch, instead of one write per piece; the last piece's
    // zeros past the source's end are punched over the destination's (unallocated) blocks.
    expect(ops).toEqual(['write 0', `punch ${2 * P}`, `write ${3 * P}`, `punch ${7 * P + 8 * K}`]);
    // The pieces 1 KiB apart are one read of their span; it reads short at the end of the file, and
    // the read of the rest finds nothing.
    expect(reads).toEqual([[base, 7 * 33 * K + P], [fileEnd, base + 7 * 33 * K + P - fileEnd]]);
    expect(await d.size()).toBe(fileEnd);
  });

  it('a read failing while other reads of the run are in flight: no further piece is read, the error comes out after every read has ended, nothing written', async () => {
    const d = new MemoryBlockDevice('img');
    // Pieces 12 KiB apart: farther than a span reaches, so one read each.
    for (let k = 0; k < 32; k++) await d.write(pattern(4 * K, k), k * 16 * K);
    const { dev, ops, inFlight } = watched(d);
    let reads = 0;
    let maxInFlight = 0;
    const failing: BlockDevice = {
      ...dev,
      read: async (b, o) => {
        reads++;
        maxInFlight = Math.max(maxInFlight, inFlight() + 1);
        if (o === 3 * 16 * K) throw new Error('EIO (injected read)');
        return dev.read(b, o);
      },
    };
    const runs = Array.from({ length: 32 }, (_, k) => ({ from: k * 16 * K, to: 1024 * K + k * 4 * K, length: 4 * K }));
    const copier = await FreeSpaceCopier.open(failing, 128 * K);
    await expect(copier.copy(gatherRuns(runs, 128 * K), () => {})).rejects.toThrow('EIO (injected read)');
    expect(inFlight()).toBe(0);
    expect(ops).toEqual([]);
    // Bounded and stopped: at most eight reads at once, and the pieces after the failure not started.
    expect(maxInFlight).toBeLessThanOrEqual(8);
    expect(maxInFlight).toBeGreaterThan(1);
    expect(reads).toBeLessThan(32);
  });
});

describe('executeRelocation', () => {
  it('a round copying into the old places of the round before (not punched) leaves zeros where its data has zero blocks', async () => {
    // Round 1: unit A (all data) moves from [0, 64K) to scratch at 512K. Round 2: unit B, whose first
    // half is zeros, moves from [64K, 128K) into A's old place [0, 64K), which still holds A's bytes.
    const CS = 64 * K;
    const a = pattern(CS, 3);
    const b = new Uint8Array(CS);
    b.set(pattern(CS / 2, 4), CS / 2);
    const d = new MemoryBlockDevice('img');
    await d.write(a, 0);
    await d.write(b, CS);
    await d.truncate(1024 * K);
    const ptr = (at: number) => ({ offset: 768 * K + at, encode: (to: number) => new Uint8Array(new Float64Array([to]).buffer) });
    const units: Unit[] = [
      { guest: 8 * CS, host: 0, length: CS, level: 0, pointer: ptr(0) },
      { guest: 0, host: CS, length: CS, level: 0, pointer: ptr(8) },
    ];
    const plan: RelocationPlan = {
      rounds: [[{ unit: 0, from: 0, to: 8 * CS, length: CS, kind: 'evict' }], [{ unit: 1, from: CS, to: 0, length: CS, kind: 'place' }]],
      movedBytes: 2 * CS,
      largestRound: CS,
      scratchPeak: CS,
      scratchEnd: 9 * CS,
      parked: [],
      placed: [1],
    };
    const { dev, ops } = watched(d);
    await executeRelocation(dev, units, plan, () => {});
    expect(Buffer.from(await readAt(d, 0, CS)).equals(Buffer.from(b))).toBe(true);
    expect(Buffer.from(await readAt(d, 8 * CS, CS)).equals(Buffer.from(a))).toBe(true);
    // Round 1's old place is left for round 2 to overwrite, which punches the zero half and writes the
    // rest; round 2's old place is punched after its pointer is durable.
    expect(ops).toEqual([
      `write ${8 * CS}`, 'flush undefined', `write ${768 * K}`, 'flush undefined',
      'punch 0', `write ${CS / 2}`, 'flush undefined', `write ${768 * K + 8}`, 'flush undefined', `punch ${CS}`,
    ]);
    expect(Buffer.from(await readAt(d, CS, CS)).every((x) => x === 0)).toBe(true);
  });
});
