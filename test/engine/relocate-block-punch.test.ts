/**
 * Relocation of units smaller than the file system block (512-byte VMDK grains): executeRelocation
 * punches each round's old places widened to whole 4 KiB blocks (relocate.ts blockPunches), so a block
 * whose last live byte leaves is freed in that round — also when its other parts were vacated in
 * earlier rounds, or are space the source had already punched. Checked on random layouts, on a device
 * that keeps allocation per 4 KiB block as a file system does (a punch frees only the blocks it covers
 * whole): after every round, every allocated block holds a byte of a live unit, of a pinned structure
 * (the pointer table, the source's other tables) or of the next round's destinations (left for its copy
 * to overwrite) — or was allocated before and never held a unit (free space with zeros written, which
 * is reclaim's to punch, not the relocation's); and every live byte still reads what it held (units at their current places, pinned
 * bytes, pointers naming the current places).
 */
import { describe, expect } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { HOLE_BLOCK } from '../../src/blockdev/sparse.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { executeRelocation, planMoveRelocation, planRelocation, scratchBaseFor, type MoveTarget, type RelocationPlan, type Unit } from '../../src/engine/relocate.js';

const S = 512;
const B = HOLE_BLOCK;

/** A MemoryBlockDevice whose allocation is kept per 4 KiB block: a write allocates every block it touches, a punch frees the blocks it covers whole. */
class BlockDevice4K {
  readonly mem = new MemoryBlockDevice('img');
  readonly blocks = new Set<number>();
  /** Punches since the list was last emptied. */
  readonly punches: { start: number; length: number }[] = [];
  readonly dev: BlockDevice;

  constructor() {
    const mem = this.mem;
    this.dev = {
      path: 'img',
      writable: true,
      size: () => mem.size(),
      allocated: async () => this.blocks.size * B,
      read: (b, o) => mem.read(b, o),
      write: async (b, o) => {
        await mem.write(b, o);
        for (let k = Math.floor(o / B); k * B < o + b.length; k++) this.blocks.add(k);
      },
      flush: () => mem.flush(),
      truncate: async (n) => {
        await mem.truncate(n);
        for (const k of [...this.blocks]) if (k * B >= n) this.blocks.delete(k);
      },
      punchHole: async (o, n) => {
        const end = Math.min(o + n, mem.sizeSync());
        this.punches.push({ start: o, length: n });
        await mem.punchHole(o, n);
        for (let k = Math.ceil(o / B); (k + 1) * B <= end; k++) this.blocks.delete(k);
        // The file's last block, cut short by its end, is freed by a punch to the end.
        const lastBlock = Math.floor(end / B);
        if (end === mem.sizeSync() && end % B !== 0 && o <= lastBlock * B) this.blocks.delete(lastBlock);
      },
      nextData: (o) => mem.nextData(o),
      nextHole: (o) => mem.nextHole(o),
      close: () => mem.close(),
    };
  }
}

function bytesOf(seed: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = ((x >>> 0) % 255) + 1; // never zero: live bytes are never mistaken for free space
  }
  return b;
}

/**
 * The source: a pointer table (8 bytes per unit, the unit's host) in the first block, then pieces of
 * 512-byte sectors in random order — units (random bytes), pinned structures (random bytes, or zeros:
 * a table with no entries yet), and free space that reads zeros (a hole, or zeros written: space a
 * conversion step before gave up).
 */
type Piece = { kind: 'unit' | 'pinned' | 'pinned-zero' | 'hole' | 'zeros'; sectors: number };
const pieces = fc.array(
  fc.record({ kind: fc.constantFrom<Piece['kind']>('unit', 'unit', 'unit', 'unit', 'pinned', 'pinned-zero', 'hole', 'zeros'), sectors: fc.integer({ min: 1, max: 12 }) }),
  { minLength: 1, maxLength: 40 },
);

interface Source {
  dev: BlockDevice4K;
  units: Unit[];
  data: Uint8Array[];
  /** Live bytes that never move, and what they hold. */
  pinned: { start: number; bytes: Uint8Array }[];
  end: number;
}

async function build(layout: Piece[]): Promise<Source> {
  const dev = new BlockDevice4K();
  const units: Unit[] = [];
  const data: Uint8Array[] = [];
  const pinned: { start: number; bytes: Uint8Array }[] = [];
  let at = B; // the table's block
  let seed = 1;
  for (const p of layout) {
    for (let s = 0; s < p.sectors; s++, at += S) {
      if (p.kind === 'unit') {
        const bytes = bytesOf(seed++, S);
        const i = units.length;
        units.push({ host: at, length: S, level: 0, guest: 0, pointer: { offset: 8 * i, encode: (h) => le64(h) } });
        data.push(bytes);
        await dev.dev.write(bytes, at);
      } else if (p.kind === 'pinned' || p.kind === 'pinned-zero') {
        const bytes = p.kind === 'pinned' ? bytesOf(seed++, S) : new Uint8Array(S);
        pinned.push({ start: at, bytes });
        await dev.dev.write(bytes, at);
      } else if (p.kind === 'zeros') await dev.dev.write(new Uint8Array(S), at);
    }
  }
  // The file ends where the layout does (a hole at the end included).
  if ((await dev.dev.size()) < at) await dev.dev.truncate(at);
  for (const [i, u] of units.entries()) await dev.dev.write(le64(u.host), 8 * i);
  return { dev, units, data, pinned, end: at };
}

function le64(n: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
}

/** Runs the plan, checking allocation and contents after every round. */
async function runAndCheck(src: Source, units: Unit[], plan: RelocationPlan): Promise<void> {
  const { dev } = src;
  const indexOf = new Map(units.map((u, i) => [u, src.units.indexOf(u)]));
  const host = src.units.map((u) => u.host);
  const tableBlocks = Math.ceil((8 * src.units.length) / B);
  // Blocks allocated before that hold no unit (zeros written over free space): nothing the relocation
  // vacates lies there, so they are not its to free (reclaim's, at the end).
  const untouched = new Set(dev.blocks);
  for (const u of src.units) for (let k = Math.floor(u.host / B); k * B < u.host + u.length; k++) untouched.delete(k);
  let checked = 0;
  await executeRelocation(dev.dev, units, plan, () => {}, undefined, async (r) => {
    checked++;
    for (const s of plan.rounds[r]!) host[indexOf.get(units[s.unit]!)!] = s.to;
    const live = new Set<number>();
    const mark = (start: number, length: number) => {
      for (let k = Math.floor(start / B); k * B < start + length; k++) live.add(k);
    };
    for (let k = 0; k < tableBlocks; k++) live.add(k);
    for (const k of untouched) live.add(k);
    src.units.forEach((u, i) => mark(host[i]!, u.length));
    for (const p of src.pinned) mark(p.start, p.bytes.length);
    for (const s of plan.rounds[r + 1] ?? []) mark(s.to, s.length);
    const stray = [...dev.blocks].filter((k) => !live.has(k)).sort((a, b) => a - b);
    expect(stray, `round ${r}: allocated blocks holding nothing live`).toEqual([]);
    // The places the next round copies into are left for its copy to overwrite, blocks widened included.
    for (const p of dev.punches.splice(0)) {
      for (const s of plan.rounds[r + 1] ?? []) expect(p.start < s.to + s.length && s.to < p.start + p.length, `round ${r}: punch ${p.start}+${p.length} into the next round's ${s.to}`).toBe(false);
    }
    // Every live byte reads what it held.
    for (const [i, u] of src.units.entries()) {
      const got = new Uint8Array(u.length);
      await dev.mem.read(got, host[i]!);
      expect(Buffer.from(got).equals(Buffer.from(src.data[i]!)), `round ${r}: unit ${i} at ${host[i]}`).toBe(true);
      const p = new Uint8Array(8);
      await dev.mem.read(p, 8 * i);
      expect(Buffer.from(p).equals(Buffer.from(le64(host[i]!))), `round ${r}: pointer of unit ${i}`).toBe(true);
    }
    for (const p of src.pinned) {
      const got = new Uint8Array(p.bytes.length);
      await dev.mem.read(got, p.start);
      expect(Buffer.from(got).equals(Buffer.from(p.bytes)), `round ${r}: pinned bytes at ${p.start}`).toBe(true);
    }
  });
  expect(checked).toBe(plan.rounds.length);
}

describe('relocation of 512-byte units frees whole 4 KiB blocks', () => {
  propTest.prop([pieces, fc.integer({ min: 0, max: 1_000_000 }), fc.constantFrom(1024, 4096, 16384)], { numRuns: 150 })(
    'moves to 4 KiB-aligned destinations past the end (VMDK grains → QED clusters), rounds of the window',
    async (layout, shuffle, window) => {
      const src = await build(layout);
      if (src.units.length === 0) return;
      // Guest order is a rotation of host order, with a gap of a few sectors now and then. Every third
      // guest cluster stays where it is: its units are live but not the relocation's (no move covers them).
      const n = src.units.length;
      src.units.forEach((u, i) => (u.guest = (((i + shuffle) % n) + Math.floor(((i + shuffle) % n) / 7) * (shuffle % 3)) * S));
      const base = Math.ceil(src.end / B) * B + B;
      const moves: MoveTarget[] = [];
      const clusters = new Set(src.units.map((u) => Math.floor(u.guest / B)).filter((c) => c % 3 !== 2));
      for (const c of [...clusters].sort((a, b) => a - b)) moves.push({ guest: c * B, length: B, to: base + c * B, room: B });
      const dataRuns = src.units.filter((u) => clusters.has(Math.floor(u.guest / B))).map((u) => ({ guest: u.guest, length: u.length, host: u.host }));
      const r = planMoveRelocation(src.units, moves, dataRuns, S, window);
      expect(r).toBeDefined();
      await runAndCheck(src, r!.units, r!.plan);
    },
  );

  propTest.prop([pieces, fc.integer({ min: 0, max: 1_000_000 }), fc.constantFrom(2048, 8192)], { numRuns: 150 })(
    'identity placement (VMDK grains → raw): chains, evictions to scratch and back, rounds of the window',
    async (layout, shuffle, window) => {
      const src = await build(layout);
      if (src.units.length === 0) return;
      // Guests: distinct sectors of the layout's range, a shuffle of where units lie, shifted a little.
      const n = src.units.length;
      const V = src.end + 4 * S;
      const slots = [...Array(V / S).keys()].filter((k) => k >= B / S);
      for (let i = slots.length - 1; i > 0; i--) {
        const j = (shuffle * (i + 7)) % (i + 1);
        [slots[i], slots[j]] = [slots[j]!, slots[i]!];
      }
      src.units.forEach((u, i) => (u.guest = slots[i % slots.length]! * S));
      if (new Set(src.units.map((u) => u.guest)).size !== n) return;
      const pinned = [{ start: 0, length: B }, ...src.pinned.filter((p) => p.bytes.length > 0).map((p) => ({ start: p.start, length: p.bytes.length }))];
      const scratchBase = scratchBaseFor([src.end, V, ...src.units.map((u) => Math.max(u.host, u.guest) + u.length)], S);
      const plan = planRelocation({ units: src.units, pinned, virtualSize: V, scratchBase, alignment: S, window });
      await runAndCheck(src, src.units, plan);
    },
  );
});
