/** The host-file picture: which cell shows what, on which scale. */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { HostSpace } from '../../src/host-space.js';
import { hostPictures, hostStrip, stripText, type HostLayout } from '../../src/progress/strip.js';

const KiB = 1024;
const MiB = 1 << 20;

function layout(fileSize: number, ...ranges: [number, number, 'header' | 'metadata' | 'data'][]): HostLayout {
  return { fileSize, ranges: ranges.map(([start, length, role]) => ({ start, length, role })) };
}

describe('host strip', () => {
  it('one cell per share of the file: header, tables, data, free', () => {
    const l = layout(10 * KiB, [0, 512, 'header'], [1 * KiB, 2 * KiB, 'metadata'], [3 * KiB, 5 * KiB, 'data']);
    expect(stripText(hostStrip(l, 'old', KiB))).toBe('H▒▒█████··');
    expect(stripText(hostStrip(l, 'new', KiB))).toBe('H▓▓█████··');
  });

  it('a cell shows what most of its bytes hold, and any header wins', () => {
    // cell 0: header + data; cell 1: 700 B data, 300 B tables; cell 2: 600 B tables, 400 B data;
    // cell 3: 400 B data, 600 B free
    const l = layout(4000, [0, 100, 'header'], [100, 1600, 'data'], [1700, 900, 'metadata'], [2600, 800, 'data']);
    expect(stripText(hostStrip(l, 'old', 1000))).toBe('H█▒·');
  });

  it('tables too small for a cell of their own still get one, where they are densest', () => {
    // 1 GiB of data with a few 64 KiB tables, the densest run in the middle
    const l = layout(
      1024 * MiB,
      [0, 64 * KiB, 'header'],
      [64 * KiB, 400 * MiB, 'data'],
      [400 * MiB + 64 * KiB, 64 * KiB, 'metadata'],
      [600 * MiB, 256 * KiB, 'metadata'],
      [600 * MiB + 256 * KiB, 400 * MiB, 'data'],
    );
    const cells = hostStrip(l, 'new', Math.ceil(l.fileSize / 60));
    expect(cells).toHaveLength(60);
    expect(cells.filter((c) => c === 'new-tables')).toHaveLength(1);
    expect(cells.indexOf('new-tables')).toBe(Math.floor((600 * MiB) / Math.ceil(l.fileSize / 60)));
    expect(cells[0]).toBe('header');
  });

  it('ranges past the end of the file (a partial last cluster) are clipped', () => {
    const l = layout(4 * KiB, [0, 1 * KiB, 'header'], [1 * KiB, 8 * KiB, 'data']);
    expect(stripText(hostStrip(l, 'old', KiB))).toBe('H███');
  });

  it('an empty file draws nothing', () => {
    expect(hostStrip(layout(0), 'old', 1)).toEqual([]);
  });

  it('before and after share one scale, so growth and shrinking show', () => {
    const before = layout(60 * MiB, [0, MiB, 'header'], [MiB, 59 * MiB, 'data']);
    const grown = layout(120 * MiB, [0, MiB, 'header'], [MiB, 110 * MiB, 'data'], [111 * MiB, 9 * MiB, 'metadata']);
    const p = hostPictures(before, grown);
    expect(p.bytesPerCell).toBe(2 * MiB);
    expect(p.before).toHaveLength(30);
    expect(p.after).toHaveLength(60);
    expect(stripText(p.after!)).toMatch(/^H█+▓{4,5}$/);
    const alone = hostPictures(before);
    expect(alone.before).toHaveLength(60);
    expect(alone.after).toBeUndefined();
  });

  test.prop([
    fc.integer({ min: 1, max: 1 << 30 }),
    fc.array(fc.record({ start: fc.nat(1 << 30), length: fc.integer({ min: 1, max: 1 << 26 }), role: fc.constantFrom('header', 'metadata', 'data') as fc.Arbitrary<'header' | 'metadata' | 'data'> }), { maxLength: 30 }),
    fc.integer({ min: 1, max: 200 }),
  ])('matches a HostSpace of any shape: length, header cells, tables never hidden', (fileSize, rs, cellsWanted) => {
    const hs = new HostSpace('test', fileSize);
    // disjoint by construction, as HostSpace requires
    let end = 0;
    for (const r of rs.slice().sort((a, b) => a.start - b.start)) {
      const s = Math.max(r.start, end);
      hs.add(s, r.length, r.role, r.role);
      end = s + r.length;
    }
    const l: HostLayout = { fileSize, ranges: hs.ranges() };
    const bpc = Math.max(1, Math.ceil(fileSize / cellsWanted));
    const cells = hostStrip(l, 'old', bpc);
    expect(cells).toHaveLength(Math.ceil(fileSize / bpc));
    const inFile = hs.ranges().filter((r) => r.start < fileSize);
    for (let c = 0; c < cells.length; c++) {
      const hasHeader = inFile.some((r) => r.role === 'header' && r.start < (c + 1) * bpc && r.start + r.length > c * bpc);
      expect(cells[c] === 'header').toBe(hasHeader);
    }
    // tables anywhere outside the header's cells always show
    const tablesShown = inFile.some((r) => r.role === 'metadata' && cells.some((c, i) => c !== 'header' && r.start < (i + 1) * bpc && r.start + r.length > i * bpc));
    if (tablesShown) expect(cells).toContain('old-tables');
    if (hs.free().length === 0) expect(cells).not.toContain('free');
  });
});
