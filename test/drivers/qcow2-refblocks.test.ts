/**
 * The qcow2 target's refcount blocks: a block whose clusters are all referenced is written from one
 * buffer shared by every such block (512 of them, 32 MiB, for a fully mapped 1 TiB image). Each block
 * written must still hold exactly refcount 1 for the referenced clusters of its window and 0 elsewhere,
 * whatever the refcount width.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { encodeTables, type Qcow2TargetParams, type TargetLayout } from '../../drivers/qcow2/target.js';
import { getRefcount } from '../../drivers/qcow2/entries.js';

const cs = 512;

/** A layout with only refcount structures: refblock w at cluster 1000 + w, the reftable at cluster 900. */
function layoutOf(windows: number, referenced: [number, number][]): TargetLayout {
  return {
    l1Entries: 0,
    l1Offset: 0,
    l1Clusters: 0,
    l2: new Map(),
    reftableOffset: 900 * cs,
    reftableClusters: Math.ceil((windows * 8) / cs),
    refblocks: new Map(Array.from({ length: windows }, (_, w) => [w, (1000 + w) * cs] as [number, number])),
    referenced,
    finalLength: 0,
    metadataBytes: 0,
  };
}

function blocksOf(p: Qcow2TargetParams, layout: TargetLayout): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  for (const w of encodeTables(p, layout, [])) if (w.offset >= 1000 * cs) out.set(w.offset / cs - 1000, w.bytes);
  return out;
}

describe('refcount blocks', () => {
  it('whole windows share one all-ones block; partial and empty windows get their own', () => {
    const p: Qcow2TargetParams = { clusterSize: cs, version: 3, refcountOrder: 4, lazyRefcounts: false };
    const perBlock = (cs * 8) / 16; // 256
    const blocks = blocksOf(p, layoutOf(4, [[0, perBlock + 5], [2 * perBlock, 3 * perBlock]]));
    expect(blocks.get(0)).toBe(blocks.get(2)); // shared
    expect(blocks.get(1)).not.toBe(blocks.get(0));
    for (let k = 0; k < perBlock; k++) {
      expect(getRefcount(blocks.get(0)!, k, 4)).toBe(1);
      expect(getRefcount(blocks.get(1)!, k, 4)).toBe(k < 5 ? 1 : 0);
      expect(getRefcount(blocks.get(3)!, k, 4)).toBe(0);
    }
  });

  test.prop(
    [
      fc.integer({ min: 0, max: 6 }),
      fc.array(fc.tuple(fc.nat(3000), fc.integer({ min: 1, max: 1500 })), { maxLength: 8 }),
    ],
    { numRuns: 80 },
  )('every block holds exactly the referenced clusters of its window, at any refcount width', (order, raw) => {
    const p: Qcow2TargetParams = { clusterSize: cs, version: 3, refcountOrder: order, lazyRefcounts: false };
    const perBlock = (cs * 8) / (1 << order);
    // Disjoint, sorted intervals from the random ones.
    const set = new Set<number>();
    for (const [a, n] of raw) for (let k = a; k < a + n; k++) set.add(k);
    const sorted = [...set].sort((x, y) => x - y);
    const referenced: [number, number][] = [];
    for (const k of sorted) {
      const last = referenced[referenced.length - 1];
      if (last && last[1] === k) last[1] = k + 1;
      else referenced.push([k, k + 1]);
    }
    const windows = Math.ceil(4500 / perBlock);
    const blocks = blocksOf(p, layoutOf(windows, referenced));
    expect(blocks.size).toBe(windows);
    for (let w = 0; w < windows; w++) {
      const b = blocks.get(w)!;
      expect(b.length).toBe(cs);
      for (let k = 0; k < perBlock; k++) expect(getRefcount(b, k, order)).toBe(set.has(w * perBlock + k) ? 1 : 0);
    }
  });
});
