import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { ExtentMap, type Extent, type ExtentKind } from '../../src/extent-map.js';
import { cheapestClusterSize, clusterize } from '../../src/engine/clusters.js';

const SECTOR = 512;
/** Mappings on a 512-byte grid with random kinds and host offsets (aligned or not). */
const mapArb = fc
  .array(
    fc.record({
      kind: fc.constantFrom<ExtentKind>('data', 'data', 'zero', 'unallocated', 'compressed'),
      sectors: fc.integer({ min: 1, max: 64 }),
      hostSector: fc.nat(4096),
      contiguous: fc.boolean(),
    }),
    { minLength: 1, maxLength: 30 },
  )
  .map((rs) => {
    const runs: Extent[] = [];
    let g = 0;
    let nextHost = 0;
    for (const r of rs) {
      const len = r.sectors * SECTOR;
      const e: Extent = { guest: g, length: len, kind: r.kind };
      if (r.kind === 'data') e.host = r.contiguous ? nextHost : r.hostSector * SECTOR;
      if (r.kind === 'compressed') {
        e.host = r.hostSector * SECTOR;
        e.hostLength = 100;
      }
      nextHost = (e.host ?? 0) + len;
      g += len;
      runs.push(e);
    }
    return ExtentMap.fromArray(g, runs);
  });

describe('clusterize', () => {
  test.prop([mapArb, fc.constantFrom(512, 1024, 4096, 8192), fc.nat(8), fc.boolean()])('covers every byte once, keeps only expressible clusters', (map, cs, reservedClusters, hasBacking) => {
    const reserved = [{ start: 0, length: reservedClusters * cs }];
    const c = clusterize(map, cs, { reserved, hasBacking });
    const covered = new Map<number, string>();
    const mark = (g: number, len: number, what: string) => {
      for (let x = g; x < g + len; x += SECTOR) {
        expect(covered.has(x), `byte ${x} covered twice`).toBe(false);
        covered.set(x, what);
      }
    };
    for (const r of c.runs) {
      expect(r.guest % cs).toBe(0);
      if (r.kind === 'data') {
        expect(r.host! % cs).toBe(0);
        expect(r.host! >= reservedClusters * cs).toBe(true);
        // reads the same bytes as the source
        for (let x = r.guest; x < r.guest + r.length; x += SECTOR) {
          const e = map.at(map.indexOf(x));
          expect(e.kind).toBe('data');
          expect(e.host! + (x - e.guest)).toBe(r.host! + (x - r.guest));
        }
      } else {
        const kinds = new Set<string>();
        for (let x = r.guest; x < r.guest + r.length; x += SECTOR) kinds.add(map.at(map.indexOf(x)).kind);
        expect([...kinds].every((k) => k === 'zero' || k === 'unallocated')).toBe(true);
        // over a backing file a kept run reads exactly what it says: never zeros and backing mixed
        if (hasBacking) expect(kinds.size).toBe(1);
        if (r.kind === 'unallocated') expect(kinds.has('zero')).toBe(false);
      }
      mark(r.guest, r.length, 'run');
    }
    for (const m of c.mustMove) {
      expect(m.guest % cs).toBe(0);
      mark(m.guest, m.length, 'move');
    }
    expect(covered.size).toBe(map.virtualSize / SECTOR);
    expect(c.moveBytes).toBe(c.mustMove.reduce((s, m) => s + m.length, 0));
  });

  it('keeps a large contiguous aligned run in one piece and moves only the header cluster', () => {
    const cs = 65536;
    const map = ExtentMap.fromArray(2 ** 40, [{ guest: 0, length: 2 ** 40, kind: 'data', host: 0 }]);
    const c = clusterize(map, cs, { reserved: [{ start: 0, length: cs }] });
    expect(c.mustMove).toEqual([{ guest: 0, length: cs, reason: 'data lies where the new format keeps its header' }]);
    expect(c.runs).toEqual([{ guest: cs, length: 2 ** 40 - cs, kind: 'data', host: cs }]);
  });

  it('chooses the cheapest cluster size, counting moved bytes twice', () => {
    expect(cheapestClusterSize([{ cs: 4096, moveBytes: 4096, metadataBytes: 1 << 30 }, { cs: 65536, moveBytes: 65536, metadataBytes: 1 << 20 }], 65536)).toBe(65536);
    expect(cheapestClusterSize([{ cs: 4096, moveBytes: 0, metadataBytes: 100 }, { cs: 65536, moveBytes: 0, metadataBytes: 100 }], 65536)).toBe(65536);
    // moving 8 MiB of data twice costs more than the slack: the small cluster that keeps data in place wins
    expect(cheapestClusterSize([{ cs: 512, moveBytes: 0, metadataBytes: 1 << 20 }, { cs: 65536, moveBytes: 8 << 20, metadataBytes: 1 << 18 }], 65536, 64 << 20)).toBe(512);
  });

  it('prefers the default cluster size when the cheaper one saves less than the slack', () => {
    // a small disk: 4 KiB clusters would save ~480 KiB of QED tables; not worth leaving the default
    expect(cheapestClusterSize([{ cs: 4096, moveBytes: 0, metadataBytes: 36 << 10 }, { cs: 65536, moveBytes: 0, metadataBytes: 512 << 10 }], 65536, 64 << 20)).toBe(65536);
    // a 100 GiB raw disk: 4 KiB clusters would cost 200 MiB of tables; 512 KiB is cheapest by far
    const vs = 100 * 2 ** 30;
    const c = [
      { cs: 4096, moveBytes: 4096, metadataBytes: 200 << 20 },
      { cs: 65536, moveBytes: 65536, metadataBytes: 13 << 20 },
      { cs: 524288, moveBytes: 524288, metadataBytes: 4 << 20 },
    ];
    expect(cheapestClusterSize(c, 65536, vs)).toBe(65536); // 13 MiB vs 5 MiB: within 1 MiB + 25 MiB slack
  });
});
