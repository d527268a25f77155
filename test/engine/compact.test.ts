import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { clustersCovered } from '../../src/engine/compact.js';

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
