import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { clustersCovered, mergedRanges } from '../../src/engine/compact.js';

describe('clustersCovered', () => {
  it('counts a partial cluster split into data and tail once', () => {
    expect(clustersCovered([{ start: 4096, length: 1024 }, { start: 5120, length: 3072 }], 4096)).toBe(1);
    expect(clustersCovered([{ start: 0, length: 4096 }, { start: 8192, length: 1 }], 4096)).toBe(2);
  });
  test.prop([fc.array(fc.record({ start: fc.nat(100_000), length: fc.integer({ min: 1, max: 20_000 }) }), { maxLength: 20 }), fc.constantFrom(512, 4096, 65536)])(
    'equals the size of the set of touched cluster indices',
    (ranges, cs) => {
      const set = new Set<number>();
      for (const r of ranges) for (let c = Math.floor(r.start / cs); c <= Math.floor((r.start + r.length - 1) / cs); c++) set.add(c);
      expect(clustersCovered(ranges, cs)).toBe(set.size);
    },
  );
});

describe('mergedRanges (the destinations punched at once before a round of copies)', () => {
  it('joins ranges that touch or overlap, keeps apart those with a gap, drops empty ones', () => {
    expect(mergedRanges([{ start: 8192, end: 12288 }, { start: 0, end: 4096 }, { start: 4096, end: 8192 }, { start: 16384, end: 20480 }, { start: 30000, end: 30000 }])).toEqual([
      { start: 0, end: 12288 },
      { start: 16384, end: 20480 },
    ]);
    expect(mergedRanges([{ start: 10, end: 100 }, { start: 20, end: 30 }])).toEqual([{ start: 10, end: 100 }]);
    expect(mergedRanges([])).toEqual([]);
  });
  test.prop([fc.array(fc.record({ start: fc.nat(2_000), length: fc.integer({ min: -5, max: 300 }) }), { maxLength: 30 })])(
    'covers exactly the union, with ascending ranges that neither touch nor overlap',
    (rs) => {
      const out = mergedRanges(rs.map((r) => ({ start: r.start, end: r.start + r.length })));
      const want = new Set<number>();
      for (const r of rs) for (let b = r.start; b < r.start + r.length; b++) want.add(b);
      const got = new Set<number>();
      for (const r of out) for (let b = r.start; b < r.end; b++) got.add(b);
      expect([...got].sort((a, b) => a - b)).toEqual([...want].sort((a, b) => a - b));
      for (let i = 1; i < out.length; i++) expect(out[i]!.start).toBeGreaterThan(out[i - 1]!.end);
      for (const r of out) expect(r.end).toBeGreaterThan(r.start);
    },
  );
});
