/**
 * Crafted leaks and corruptions: each damaged image is checked by imgconv and by qemu-img check,
 * and every counter (corruptions, leaks, check errors, image end, cluster statistics) must agree.
 * Damage that breaks the mapping must also make mapping()/hostSpace() refuse with a FormatError.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawnSync } from 'node:child_process';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';
import { getU32, getU64, openQcow2Chain, ourCheckShape, qemuCheck, qemuCheckFull, qemuImg, qemuIoIn, setU64 } from './qcow2-support.js';

const haveQemu = qemuAvailable();

/** Offsets inside a fresh image: header fields, first L2, first data cluster, first refblock. */
function locate(b: Uint8Array) {
  const l1 = Number(getU64(b, 40));
  const l2 = Number(getU64(b, l1) & 0x00fffffffffffe00n);
  const data = Number(getU64(b, l2) & 0x00fffffffffffe00n);
  const reftable = Number(getU64(b, 48));
  const refblock = Number(getU64(b, reftable) & ~0x1ffn);
  const cs = 2 ** getU32(b, 20);
  return { l1, l2, data, reftable, refblock, cs };
}

type Damage = (b: Uint8Array, at: ReturnType<typeof locate>) => Uint8Array;

const setRefcount16 = (b: Uint8Array, refblock: number, cluster: number, v: number) => {
  new DataView(b.buffer, b.byteOffset).setUint16(refblock + 2 * cluster, v);
};

const cases: [string, Damage, { mappingRefuses?: string; expectLeaks?: boolean; expectCorruptions?: boolean }][] = [
  ['refcount of a data cluster raised to 2 (leak + COPIED)', (b, a) => { setRefcount16(b, a.refblock, a.data / a.cs, 2); return b; }, { expectLeaks: true, expectCorruptions: true }],
  ['an extra cluster at the end with refcount 1 (pure leak)', (b, a) => {
    const out = new Uint8Array(b.length + a.cs);
    out.set(b);
    setRefcount16(out, a.refblock, Math.ceil(b.length / a.cs), 1);
    return out;
  }, { expectLeaks: true }],
  ['refcount of a data cluster zeroed', (b, a) => { setRefcount16(b, a.refblock, a.data / a.cs, 0); return b; }, { expectCorruptions: true }],
  ['refcount of the L2 table zeroed', (b, a) => { setRefcount16(b, a.refblock, a.l2 / a.cs, 0); return b; }, { expectCorruptions: true }],
  ['COPIED cleared on a data entry', (b, a) => { setU64(b, a.l2, getU64(b, a.l2) & ~(1n << 63n)); return b; }, { expectCorruptions: true }],
  ['COPIED cleared on the L1 entry', (b, a) => { setU64(b, a.l1, getU64(b, a.l1) & ~(1n << 63n)); return b; }, { expectCorruptions: true }],
  ['data entry unaligned', (b, a) => { setU64(b, a.l2, getU64(b, a.l2) + 512n); return b; }, { mappingRefuses: 'data cluster offset', expectCorruptions: true }],
  ['data entry past the end of the file', (b, a) => { setU64(b, a.l2, (1n << 63n) | BigInt(a.data + 64 * a.cs)); return b; }, { mappingRefuses: 'data cluster offset', expectCorruptions: true }],
  ['L2 entry with reserved bits', (b, a) => { setU64(b, a.l2, getU64(b, a.l2) | (1n << 57n)); return b; }, { mappingRefuses: 'L2 entry', expectCorruptions: true }],
  ['L1 entry with reserved bits', (b, a) => { setU64(b, a.l1, getU64(b, a.l1) | 2n); return b; }, { mappingRefuses: 'L1 entry', expectCorruptions: true }],
  ['two L2 entries share a data cluster', (b, a) => { setU64(b, a.l2 + 8, getU64(b, a.l2)); return b; }, { expectCorruptions: true }],
  ['refcount table entry with reserved bits', (b, a) => { setU64(b, a.reftable, getU64(b, a.reftable) | 1n); return b; }, { expectCorruptions: true }],
];

describe.skipIf(!haveQemu)('crafted damage: imgconv check equals qemu-img check', () => {
  const t = withTmpDir('imgconv-qcow2-check-');
  let clean: Uint8Array;
  beforeAll(() => {
    const p = t.path('clean.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', p, '4M']);
    qemuIoIn(p, ['write -P 0x5a 0 16k', 'write -P 0x5b 1M 8k']);
    clean = new Uint8Array(readFileSync(p));
  });
  afterAll(() => t.cleanup());

  cases.forEach(([name, damage, expectation], i) => {
    test(name, async () => {
      const bytes = damage(clean.slice(), locate(clean));
      const p = t.path(`damaged-${i}.qcow2`);
      writeFileSync(p, bytes);
      const theirs = qemuCheckFull(p);
      const chain = await openQcow2Chain(p);
      try {
        const img = chain.layers[0]!;
        const report = await img.check();
        const ours = ourCheckShape(report);
        expect(ours).toEqual(theirs.counts);
        expect(report.messages).toEqual(theirs.lines);
        if (expectation.expectLeaks) expect(ours.leaks).toBeGreaterThan(0);
        if (expectation.expectCorruptions) expect(ours.corruptions).toBeGreaterThan(0);
        if (expectation.mappingRefuses) {
          const err = await img.mapping().then(() => null, (e: unknown) => e);
          expect(err).toBeInstanceOf(FormatError);
          expect((err as FormatError).field).toBe(expectation.mappingRefuses);
          await expect(img.hostSpace()).rejects.toBeInstanceOf(FormatError);
        }
      } finally {
        await chain.close();
      }
    });
  });

  test('a shared data cluster is an overlap in host space', async () => {
    const bytes = clean.slice();
    const a = locate(clean);
    setU64(bytes, a.l2 + 8, getU64(bytes, a.l2));
    const p = t.path('overlap.qcow2');
    writeFileSync(p, bytes);
    const chain = await openQcow2Chain(p);
    await expect(chain.layers[0]!.hostSpace()).rejects.toThrow(/overlaps/);
    await chain.close();
  });

  test('snapshot images with damage after the snapshot', async () => {
    const p = t.path('snapdmg.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', p, '4M']);
    qemuIoIn(p, ['write -P 1 0 8k']);
    qemuImg(['snapshot', '-c', 'a', p]);
    qemuIoIn(p, ['write -P 2 4k 4k']);
    const b = new Uint8Array(readFileSync(p));
    const a = locate(b);
    // The snapshot shares the first data cluster (refcount 2); drop it to 1.
    setRefcount16(b, a.refblock, a.data / a.cs, 1);
    writeFileSync(p, b);
    const chain = await openQcow2Chain(p);
    expect(ourCheckShape(await chain.layers[0]!.check())).toEqual(qemuCheck(p));
    await chain.close();
  });

  const compareWithQemu = async (p: string) => {
    const theirs = qemuCheckFull(p);
    const chain = await openQcow2Chain(p);
    try {
      const report = await chain.layers[0]!.check();
      expect(ourCheckShape(report)).toEqual(theirs.counts);
      expect(report.messages).toEqual(theirs.lines);
      return { report, img: chain.layers[0]! };
    } finally {
      await chain.close();
    }
  };

  test('lazy refcounts, writer killed: dirty bit and stale refcounts', async () => {
    const p = t.path('lazy-abort.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k', p, '1M']);
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 16k', '-c', 'abort', p], { stdio: 'ignore' });
    const { report, img } = await compareWithQemu(p);
    expect(img.info.dirty).toBe(true);
    expect(report.corruptions).toBeGreaterThan(0);
  });

  test('bitmaps left inconsistent (autoclear bit cleared): their clusters leak, as in QEMU', async () => {
    const p = t.path('stale-bitmap.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', p, '1M']);
    qemuImg(['bitmap', '--add', p, 'b0']);
    const b = new Uint8Array(readFileSync(p));
    setU64(b, 88, getU64(b, 88) & ~1n);
    writeFileSync(p, b);
    const { report, img } = await compareWithQemu(p);
    expect(report.leaks).toBeGreaterThan(0);
    expect(img.info.features).toContain('inconsistent bitmaps (ignored)');
  });

  test('zstd-compressed image: mapping and check as qemu; decompression refused', async () => {
    const raw = t.path('z.raw');
    qemuImg(['create', '-q', '-f', 'raw', raw, '1M']);
    spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 64k', raw], { stdio: 'ignore' });
    const p = t.path('z.qcow2');
    qemuImg(['convert', '-q', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=4k', raw, p]);
    await compareWithQemu(p);
    const chain = await openQcow2Chain(p);
    const img = chain.layers[0]!;
    expect(img.info.details['compression-type']).toBe('zstd');
    const m = await img.mapping();
    expect(m.at(0).kind).toBe('compressed');
    await expect(img.readCompressed!(m.at(0))).rejects.toBeInstanceOf(UnsupportedError);
    await chain.close();
  });
});
