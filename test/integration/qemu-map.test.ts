import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { diffMaps, normaliseMap, parseMapJson, type RawMapEntry } from '../support/qemu-map.js';

const e = (start: number, length: number, o: Partial<RawMapEntry> = {}): RawMapEntry => ({
  start,
  length,
  depth: 0,
  present: true,
  zero: false,
  data: true,
  ...o,
});

describe('normaliseMap', () => {
  it('merges data runs whose offsets continue', () => {
    expect(normaliseMap([e(0, 4096, { offset: 8192 }), e(4096, 4096, { offset: 12288 })])).toEqual([
      { start: 0, length: 8192, depth: 0, present: true, zero: false, data: true, offset: 8192 },
    ]);
  });

  it('keeps data runs apart when the offsets jump', () => {
    expect(normaliseMap([e(0, 4096, { offset: 8192 }), e(4096, 4096, { offset: 65536 })])).toHaveLength(2);
  });

  it('ignores the zero flag on data entries (data over a file hole)', () => {
    const m = normaliseMap([e(0, 4096, { offset: 0 }), e(4096, 4096, { offset: 4096, zero: true })]);
    expect(m).toEqual([{ start: 0, length: 8192, depth: 0, present: true, zero: false, data: true, offset: 0 }]);
  });

  it('keeps the zero flag on data:false entries', () => {
    const m = normaliseMap([
      e(0, 4096, { data: false, zero: true }),
      e(4096, 4096, { data: false, zero: false, present: false }),
    ]);
    expect(m.map((x) => x.zero)).toEqual([true, false]);
  });

  it('merges entries without offsets, but not one with and one without', () => {
    const none = normaliseMap([e(0, 512, { data: false, zero: true }), e(512, 512, { data: false, zero: true })]);
    expect(none).toHaveLength(1);
    const mixed = normaliseMap([e(0, 512, { data: false, zero: true, offset: 0 }), e(512, 512, { data: false, zero: true })]);
    expect(mixed).toHaveLength(2);
  });

  it('merges zero runs with contiguous offsets (raw holes, preallocated zero clusters)', () => {
    const m = normaliseMap([e(0, 512, { data: false, zero: true, offset: 0 }), e(512, 512, { data: false, zero: true, offset: 512 })]);
    expect(m).toEqual([{ start: 0, length: 1024, depth: 0, present: true, zero: true, data: false, offset: 0 }]);
  });

  it('never merges across depths or presence', () => {
    expect(normaliseMap([e(0, 512, { depth: 0 }), e(512, 512, { depth: 1 })])).toHaveLength(2);
    expect(
      normaliseMap([e(0, 512, { present: false, data: false, zero: true }), e(512, 512, { present: true, data: false, zero: true })]),
    ).toHaveLength(2);
  });

  it('drops compressed and filename, and zero-length entries', () => {
    const m = normaliseMap([e(0, 0), e(0, 512, { compressed: true, filename: 'x', offset: 0 }), e(512, 512, { compressed: false, offset: 512 })]);
    expect(m).toEqual([{ start: 0, length: 1024, depth: 0, present: true, zero: false, data: true, offset: 0 }]);
  });

  test.prop([
    fc.array(
      fc.record({
        length: fc.integer({ min: 1, max: 8 }),
        depth: fc.integer({ min: 0, max: 1 }),
        present: fc.boolean(),
        zero: fc.boolean(),
        data: fc.boolean(),
        jump: fc.boolean(),
        hasOffset: fc.boolean(),
      }),
      { maxLength: 30 },
    ),
  ])('is idempotent, keeps coverage, and splitting an entry does not change the result', (specs) => {
    let pos = 0;
    let off = 0;
    const entries: RawMapEntry[] = [];
    for (const s of specs) {
      if (s.jump) off += 4096;
      const x: RawMapEntry = { start: pos * 512, length: s.length * 512, depth: s.depth, present: s.present, zero: s.zero, data: s.data };
      if (s.hasOffset) x.offset = off;
      entries.push(x);
      pos += s.length;
      off += s.length * 512;
    }
    const n = normaliseMap(entries);
    expect(normaliseMap(n)).toEqual(n);
    expect(n.reduce((t, x) => t + x.length, 0)).toBe(pos * 512);
    for (let i = 1; i < n.length; i++) expect(n[i]!.start).toBe(n[i - 1]!.start + n[i - 1]!.length);
    // Split every entry in two: the normal form must not change.
    const split: RawMapEntry[] = [];
    for (const x of entries) {
      if (x.length < 1024) {
        split.push(x);
        continue;
      }
      const h = 512;
      split.push({ ...x, length: h }, { ...x, start: x.start + h, length: x.length - h, ...(x.offset !== undefined ? { offset: x.offset + h } : {}) });
    }
    expect(normaliseMap(split)).toEqual(n);
    expect(diffMaps(entries, split)).toBeNull();
  });
});

describe('diffMaps', () => {
  it('returns null for maps equal after normalisation', () => {
    expect(diffMaps([e(0, 1024, { offset: 0 })], [e(0, 512, { offset: 0, zero: true }), e(512, 512, { offset: 512 })])).toBeNull();
  });

  it('names the first differing entry with its guest offset and both sides', () => {
    const d = diffMaps(
      [e(0, 512, { offset: 0 }), e(512, 512, { data: false, zero: true })],
      [e(0, 512, { offset: 0 }), e(512, 512, { offset: 4096 })],
    );
    expect(d).toContain('entry 1');
    expect(d).toContain('guest offset 512');
    expect(d).toContain('qemu-img [512, +512) depth 0 present zero');
    expect(d).toContain('imgconv [512, +512) depth 0 present data @4096');
  });

  it('reports a missing tail', () => {
    const d = diffMaps([e(0, 512), e(512, 512, { depth: 1 })], [e(0, 512)]);
    expect(d).toContain('imgconv (nothing)');
  });
});

describe('parseMapJson', () => {
  it('reads qemu-img map JSON', () => {
    const text = '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},\n{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false}]';
    expect(parseMapJson(text)).toHaveLength(2);
  });

  it('rejects entries missing fields', () => {
    expect(() => parseMapJson('[{"start": 0}]')).toThrow(/length/);
    expect(() => parseMapJson('{}')).toThrow(/array/);
  });
});
