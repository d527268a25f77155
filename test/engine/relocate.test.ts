/**
 * The relocation planner (src/engine/relocate.ts) and its free-space set, checked against simple
 * models: every step lands in space nothing live uses at the start of its round, no two steps of a
 * round touch the same bytes, a unit is evicted at most once, and afterwards every unit that can be is
 * at host = guest while none of the others is left inside the disk's range.
 */
import { describe, expect, it } from 'vitest';
import { test as propTest, fc } from '@fast-check/vitest';
import { IntervalSet } from '../../src/engine/intervals.js';
import { planRelocation, type Unit } from '../../src/engine/relocate.js';

describe('IntervalSet', () => {
  propTest.prop([
    fc.array(fc.record({ add: fc.boolean(), start: fc.integer({ min: 0, max: 200 }), length: fc.integer({ min: 0, max: 40 }) }), { maxLength: 60 }),
    fc.array(fc.record({ start: fc.integer({ min: 0, max: 240 }), length: fc.integer({ min: 1, max: 30 }), align: fc.constantFrom(1, 4, 8) }), { maxLength: 20 }),
  ])('agrees with a byte-per-bit model', (ops, queries) => {
    const set = new IntervalSet();
    const model = new Uint8Array(300);
    for (const op of ops) {
      if (op.add) set.add(op.start, op.length);
      else set.remove(op.start, op.length);
      model.fill(op.add ? 1 : 0, op.start, op.start + op.length);
    }
    // Ranges are sorted, disjoint, non-adjacent and exactly the model's set bytes.
    const rs = set.ranges();
    for (let i = 1; i < rs.length; i++) expect(rs[i]!.start).toBeGreaterThan(rs[i - 1]!.start + rs[i - 1]!.length);
    const fromRanges = new Uint8Array(300);
    for (const r of rs) fromRanges.fill(1, r.start, r.start + r.length);
    expect(fromRanges).toEqual(model);
    for (const q of queries) {
      const slice = model.subarray(q.start, q.start + q.length);
      const inModel = q.start + q.length <= 300;
      if (inModel) {
        expect(set.contains(q.start, q.length)).toBe(slice.every((b) => b === 1));
        expect(set.intersects(q.start, q.length)).toBe(slice.some((b) => b === 1));
      }
      let want = -1;
      for (let s = Math.ceil(q.start / q.align) * q.align; s + q.length <= 300; s += q.align) {
        if (model.subarray(s, s + q.length).every((b) => b === 1)) {
          want = s;
          break;
        }
      }
      if (want >= 0) expect(set.firstFit(q.start, q.length, q.align)).toBe(want);
    }
  });
});

const CS = 4;

/** A random layout: units of CS bytes for guest clusters, placed at distinct cluster slots, some pinned tables. */
const layout = fc
  .record({
    clusters: fc.integer({ min: 1, max: 24 }),
    slots: fc.integer({ min: 0, max: 16 }),
    seed: fc.array(fc.nat(), { minLength: 60, maxLength: 60 }),
    pinnedCount: fc.integer({ min: 0, max: 4 }),
    dataRatio: fc.integer({ min: 1, max: 4 }),
  })
  .map(({ clusters, slots, seed, pinnedCount, dataRatio }) => {
    const V = clusters * CS;
    const total = clusters + slots + pinnedCount + 1;
    // Shuffle slot numbers with the seed.
    const order = [...Array(total).keys()];
    for (let i = order.length - 1; i > 0; i--) {
      const j = seed[i % seed.length]! % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const pinned = order.slice(0, pinnedCount).map((s) => ({ start: s * CS, length: CS }));
    const units: Unit[] = [];
    let k = pinnedCount;
    for (let g = 0; g < clusters; g++) {
      if (seed[(g * 7) % seed.length]! % dataRatio === 0 && dataRatio > 1) continue; // a zero cluster
      const slot = order[k++]!;
      units.push({ guest: g * CS, host: slot * CS, length: CS, level: 0, pointer: { offset: 0, encode: () => new Uint8Array() } });
    }
    return { V, units, pinned, scratchBase: (total + 2) * CS };
  });

describe('planRelocation', () => {
  propTest.prop([layout, fc.constantFrom(CS, 2 * CS, 5 * CS, 1000)])('every step is safe and the end state is identity', ({ V, units, pinned, scratchBase }, window) => {
    const plan = planRelocation({ units, pinned, virtualSize: V, scratchBase, alignment: CS, window });
    const host = units.map((u) => u.host);
    const evicted = new Set<number>();
    const overlaps = (a: number, al: number, b: number, bl: number) => a < b + bl && b < a + al;
    let moved = 0;
    for (const round of plan.rounds) {
      expect(round.length).toBeGreaterThan(0);
      for (const s of round) {
        expect(s.from).toBe(host[s.unit]);
        // The destination is free at the start of the round: no live unit, no pinned structure.
        for (let i = 0; i < units.length; i++) expect(overlaps(s.to, s.length, host[i]!, CS), `round step ${s.unit}→${s.to} hits unit ${i} at ${host[i]}`).toBe(false);
        for (const p of pinned) expect(overlaps(s.to, s.length, p.start, p.length)).toBe(false);
        if (s.kind === 'evict') {
          expect(evicted.has(s.unit), 'evicted twice').toBe(false);
          evicted.add(s.unit);
          expect(s.to).toBeGreaterThanOrEqual(scratchBase);
        } else expect(s.to).toBe(units[s.unit]!.guest);
      }
      // Destinations of one round are disjoint.
      for (let a = 0; a < round.length; a++) for (let b = a + 1; b < round.length; b++) expect(overlaps(round[a]!.to, CS, round[b]!.to, CS)).toBe(false);
      for (const s of round) {
        host[s.unit] = s.to;
        moved += s.length;
      }
    }
    expect(plan.movedBytes).toBe(moved);
    const parked = new Set(plan.parked);
    units.forEach((u, i) => {
      if (parked.has(i)) {
        expect(pinned.some((p) => overlaps(u.guest, CS, p.start, p.length))).toBe(true);
        expect(host[i]! + CS <= V && host[i]! < V ? 'inside the disk' : 'outside').toBe('outside');
      } else expect(host[i]).toBe(u.guest);
    });
    // Each unit moves at most twice (evicted once, placed once).
    expect(moved).toBeLessThanOrEqual(2 * units.length * CS);
  });

  it('places a shifted run directly when the window allows, evicting only what blocks', () => {
    // Data shifted up by 3 clusters behind a 3-cluster header, as after any format's own header.
    const n = 64;
    const units: Unit[] = [...Array(n).keys()].map((g) => ({ guest: (g + 3) * CS, host: (g + 6) * CS, length: CS, level: 0, pointer: { offset: 0, encode: () => new Uint8Array() } }));
    const plan = planRelocation({ units, pinned: [{ start: 0, length: 3 * CS }], virtualSize: (n + 3) * CS, scratchBase: 1000 * CS, alignment: CS, window: 16 * CS });
    expect(plan.parked).toEqual([]);
    expect(plan.placed.length).toBe(n);
    // A chain shifted by 3: 3 clusters ready per round without scratch; with a 16-cluster window the
    // evictions turn that into about n / 8 rounds.
    expect(plan.rounds.length).toBeLessThan(n / 3);
    expect(plan.scratchPeak).toBeLessThanOrEqual(16 * CS + CS);
  });

  it('breaks a cycle through scratch', () => {
    // Two units swapped: each one's place is the other's.
    const mk = (guest: number, host: number): Unit => ({ guest, host, length: CS, level: 0, pointer: { offset: 0, encode: () => new Uint8Array() } });
    const plan = planRelocation({ units: [mk(0, CS), mk(CS, 0)], pinned: [], virtualSize: 2 * CS, scratchBase: 10 * CS, alignment: CS, window: 1 << 20 });
    expect(plan.placed).toEqual([0, 1]);
    expect(plan.rounds.flat().filter((s) => s.kind === 'evict').length).toBeGreaterThan(0);
    expect(plan.movedBytes).toBeLessThanOrEqual(4 * CS);
  });
});
