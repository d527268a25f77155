import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { ExtentMap } from '../../src/extent-map.js';
import { holesAsData, scanHoles } from '../../src/engine/holes.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';

describe('holesAsData', () => {
  it('turns hole-backed zero runs into data in place and leaves the rest', () => {
    const m = ExtentMap.fromArray(400, [
      { guest: 0, length: 100, kind: 'data', host: 0 },
      { guest: 100, length: 200, kind: 'zero', host: 100 },
      { guest: 300, length: 100, kind: 'zero' },
    ]);
    const out = holesAsData(m, [{ start: 150, length: 50 }]).toArray();
    expect(out).toEqual([
      { guest: 0, length: 100, kind: 'data', host: 0 },
      { guest: 100, length: 50, kind: 'zero', host: 100 },
      { guest: 150, length: 50, kind: 'data', host: 150 },
      { guest: 200, length: 100, kind: 'zero', host: 200 },
      { guest: 300, length: 100, kind: 'zero' },
    ]);
  });

  test.prop([fc.array(fc.tuple(fc.nat(1000), fc.integer({ min: 1, max: 200 })), { maxLength: 8 })])(
    'every byte keeps its host offset; only zero runs inside holes change kind',
    (rawHoles) => {
      const holes = rawHoles
        .map(([s, l]) => ({ start: s, length: l }))
        .sort((a, b) => a.start - b.start)
        .reduce<{ start: number; length: number }[]>((acc, h) => {
          const p = acc[acc.length - 1];
          if (p && h.start <= p.start + p.length) p.length = Math.max(p.length, h.start + h.length - p.start);
          else acc.push({ ...h });
          return acc;
        }, []);
      const m = ExtentMap.fromArray(1200, [
        { guest: 0, length: 300, kind: 'zero', host: 0 },
        { guest: 300, length: 300, kind: 'data', host: 300 },
        { guest: 600, length: 600, kind: 'zero', host: 600 },
      ]);
      const out = holesAsData(m, holes);
      for (let g = 0; g < 1200; g += 7) {
        const e = out.at(out.indexOf(g));
        expect(e.host! + (g - e.guest)).toBe(g);
        const inHole = holes.some((h) => g >= h.start && g < h.start + h.length);
        const wasData = g >= 300 && g < 600;
        expect(e.kind).toBe(wasData || inHole ? 'data' : 'zero');
      }
    },
  );

  it('scanHoles lists the unwritten pages of a device', async () => {
    const d = new MemoryBlockDevice();
    await d.truncate(5 * 65536);
    await d.write(new Uint8Array(10).fill(1), 2 * 65536);
    expect(await scanHoles(d)).toEqual([
      { start: 0, length: 2 * 65536 },
      { start: 3 * 65536, length: 2 * 65536 },
    ]);
  });
});
