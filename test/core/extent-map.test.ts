import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { ExtentMap, type Extent, type ExtentKind } from '../../src/extent-map.js';

/** Random run lists covering [0, size): kinds, lengths, host offsets (contiguous or not). */
const runsArb = fc
  .array(
    fc.record({
      kind: fc.constantFrom<ExtentKind>('data', 'zero', 'unallocated', 'compressed'),
      length: fc.integer({ min: 1, max: 1 << 20 }),
      host: fc.integer({ min: 0, max: 2 ** 40 }),
      contiguous: fc.boolean(),
      prealloc: fc.boolean(),
    }),
    { minLength: 1, maxLength: 60 },
  )
  .map((rs) => {
    let g = 0;
    let prevEnd = 0;
    const out: Extent[] = [];
    for (const r of rs) {
      const e: Extent = { guest: g, length: r.length, kind: r.kind };
      if (r.kind === 'data' || (r.kind === 'zero' && r.prealloc)) e.host = r.contiguous ? prevEnd : r.host;
      if (r.kind === 'compressed') {
        e.host = r.host;
        e.hostLength = 1 + (r.length % 4096);
      }
      prevEnd = (e.host ?? 0) + r.length;
      g += r.length;
      out.push(e);
    }
    return { size: g, runs: out };
  });

/** Expands runs to a per-byte-block description to compare maps independent of run boundaries. */
function describeAt(runs: Extent[], g: number): string {
  for (const r of runs) {
    if (g >= r.guest && g < r.guest + r.length) {
      if (r.kind === 'compressed') return `c:${r.host}:${r.guest}`;
      return `${r.kind}:${r.host === undefined ? '-' : r.host + (g - r.guest)}`;
    }
  }
  return 'none';
}

describe('ExtentMap', () => {
  test.prop([runsArb])('merging keeps every byte mapped exactly as pushed', ({ size, runs }) => {
    const m = ExtentMap.fromArray(size, runs);
    expect(m.isComplete()).toBe(true);
    expect(m.count).toBeLessThanOrEqual(runs.length);
    const merged = m.toArray();
    // sample boundaries and interior points of every original run
    for (const r of runs) {
      for (const g of [r.guest, r.guest + Math.floor(r.length / 2), r.guest + r.length - 1]) {
        expect(describeAt(merged, g)).toBe(describeAt(runs, g));
      }
    }
    // no two neighbours that could have merged
    for (let i = 1; i < merged.length; i++) {
      const a = merged[i - 1]!;
      const b = merged[i]!;
      if (a.kind === b.kind && a.kind !== 'compressed') {
        const mergeable = a.host === undefined ? b.host === undefined : b.host !== undefined && a.host + a.length === b.host;
        expect(mergeable).toBe(false);
      }
    }
  });

  test.prop([runsArb])('totals add up to the virtual size', ({ size, runs }) => {
    const t = ExtentMap.fromArray(size, runs).totals();
    expect(t.data + t.zero + t.unallocated + t.compressed).toBe(size);
  });

  test.prop([runsArb, fc.nat(), fc.nat()])('range() clips and moves host offsets', ({ size, runs }, a, b) => {
    const m = ExtentMap.fromArray(size, runs);
    const start = a % size;
    const len = 1 + (b % (size - start));
    let pos = start;
    for (const e of m.range(start, len)) {
      expect(e.guest).toBe(pos);
      const base = e.kind === 'compressed' ? { ...e, guest: e.guest - e.within, length: e.length + e.within } : e;
      expect(describeAt([base], e.guest)).toBe(describeAt(runs, e.guest));
      pos += e.length;
    }
    expect(pos).toBe(start + len);
  });

  it('indexOf finds runs by binary search', () => {
    const m = new ExtentMap(300);
    m.push({ guest: 0, length: 100, kind: 'data', host: 1000 });
    m.push({ guest: 100, length: 100, kind: 'zero' });
    m.push({ guest: 200, length: 100, kind: 'data', host: 5000 });
    expect(m.indexOf(0)).toBe(0);
    expect(m.indexOf(150)).toBe(1);
    expect(m.indexOf(299)).toBe(2);
    expect(m.indexOf(300)).toBe(-1);
  });

  it('refuses gaps and runs past the virtual size', () => {
    const m = new ExtentMap(100);
    m.push({ guest: 0, length: 10, kind: 'zero' });
    expect(() => m.push({ guest: 20, length: 10, kind: 'zero' })).toThrow(/does not continue/);
    expect(() => m.push({ guest: 10, length: 100, kind: 'zero' })).toThrow(/virtual size/);
  });

  it('stays small for a contiguous terabyte', () => {
    const cluster = 65536;
    const size = 2 ** 40;
    const m = new ExtentMap(size);
    for (let g = 0; g < size; g += cluster * 8192) m.push({ guest: g, length: cluster * 8192, kind: 'data', host: cluster * 3 + g });
    expect(m.count).toBe(1);
  });
});
