import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { HostSpace } from '../../src/host-space.js';
import { FormatError } from '../../src/errors.js';

describe('HostSpace', () => {
  it('reports gaps as free and merges neighbours', () => {
    const hs = new HostSpace('test', 1000);
    hs.add(0, 100, 'header', 'header');
    hs.add(300, 100, 'metadata', 'L2 table');
    hs.add(400, 100, 'metadata', 'L2 table');
    hs.add(700, 400, 'data', 'data'); // may run past EOF (partial last cluster)
    expect(hs.ranges()).toHaveLength(3);
    expect(hs.free()).toEqual([
      { start: 100, length: 200 },
      { start: 500, length: 200 },
    ]);
    expect(hs.usedEnd()).toBe(1100);
    expect(hs.totals()).toEqual({ header: 100, metadata: 200, data: 400 });
  });

  it('names both structures when they overlap', () => {
    const hs = new HostSpace('qcow2', 1 << 20);
    hs.add(65536, 65536, 'metadata', 'refcount block');
    hs.add(0, 65536, 'header', 'header');
    hs.add(98304, 512, 'data', 'data');
    try {
      hs.finish();
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(FormatError);
      expect((e as FormatError).field).toBe('data');
      expect((e as Error).message).toMatch(/overlaps refcount block/);
    }
  });

  it('lets shared compressed payloads overlap each other only', () => {
    const hs = new HostSpace('qcow2', 4096);
    hs.add(512, 700, 'data', 'compressed data', true);
    hs.add(1000, 300, 'data', 'compressed data', true);
    expect(() => hs.finish()).not.toThrow();
    const hs2 = new HostSpace('qcow2', 4096);
    hs2.add(512, 700, 'data', 'compressed data', true);
    hs2.add(1000, 300, 'metadata', 'L2 table');
    expect(() => hs2.finish()).toThrow(FormatError);
  });

  test.prop([fc.array(fc.record({ start: fc.nat(10000), length: fc.integer({ min: 1, max: 500 }) }), { maxLength: 40 })])(
    'free ∪ used covers the file exactly when nothing overlaps',
    (rs) => {
      // make them disjoint by construction
      const sorted = rs.slice().sort((a, b) => a.start - b.start);
      const disjoint: { start: number; length: number }[] = [];
      let end = 0;
      for (const r of sorted) {
        const s = Math.max(r.start, end);
        disjoint.push({ start: s, length: r.length });
        end = s + r.length;
      }
      const size = 12000;
      const hs = new HostSpace('t', size);
      for (const r of disjoint) hs.add(r.start, r.length, 'metadata', `m${r.start}`);
      const covered = new Uint8Array(size);
      for (const r of hs.ranges()) for (let i = r.start; i < Math.min(size, r.start + r.length); i++) covered[i]! += 1;
      for (const f of hs.free()) for (let i = f.start; i < f.start + f.length; i++) covered[i]! += 1;
      expect(covered.every((c) => c === 1)).toBe(true);
    },
  );
});
