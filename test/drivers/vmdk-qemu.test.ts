/**
 * VMDK against the real qemu-img 7.2: images made by qemu-img/qemu-io, compared on virtual size,
 * `qemu-img map`, guest content (sha256 of `qemu-img convert -O raw`) and `qemu-img check`.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { UnsupportedError } from '../../src/errors.js';
import { SparseImage } from '../../drivers/vmdk/sparse.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';
import { normaliseMap, openVmdk, ourMap, ourSha, qemuInfo, qemuMap, qemuRawSha } from './vmdk-support.js';

const run = qemuAvailable();
const tmp = withTmpDir('imgconv-vmdk-');

interface Variant {
  name: string;
  make: (p: (n: string) => string) => string;
  subformat: string;
  layers?: number;
}

const variants: Variant[] = [
  {
    name: 'monolithicSparse (v1)',
    subformat: 'monolithicSparse',
    make: (p) => {
      const f = p('sparse.vmdk');
      qemuImg(['create', '-f', 'vmdk', f, '64M']);
      qemuIo(f, 'vmdk', ['write -P 0xab 0 64k', 'write -P 0xcd 1M 100k', 'write -P 0x11 40M 4k', 'write -P 0x22 63M 1M']);
      return f;
    },
  },
  {
    name: 'zeroed_grain=on (v2)',
    subformat: 'monolithicSparse',
    make: (p) => {
      const f = p('zeroed.vmdk');
      qemuImg(['create', '-f', 'vmdk', '-o', 'zeroed_grain=on', f, '16M']);
      qemuIo(f, 'vmdk', ['write -P 0x11 0 128k', 'write -z 64k 64k', 'write -z 1M 64k', 'write -z 2M 100k', 'write -P 0x33 8M 64k']);
      return f;
    },
  },
  {
    name: 'streamOptimized',
    subformat: 'streamOptimized',
    make: (p) => {
      const raw = p('stream-src.raw');
      const buf = Buffer.alloc(8 << 20);
      for (let i = 0; i < 3 << 20; i++) buf[i] = (i * 7919 + (i >> 9)) & 0xff;
      buf.fill(0, 640 << 10, 768 << 10);
      buf.fill(0x5a, 5 << 20, (5 << 20) + 1000);
      writeFileSync(raw, buf);
      const f = p('stream.vmdk');
      qemuImg(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, f]);
      return f;
    },
  },
  {
    name: 'monolithicFlat',
    subformat: 'monolithicFlat',
    make: (p) => {
      const f = p('flat.vmdk');
      qemuImg(['create', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', f, '10M']);
      qemuIo(f, 'vmdk', ['write -P 0x01 64k 64k', 'write -P 0x02 5M 1M']);
      return f;
    },
  },
  {
    name: 'twoGbMaxExtentFlat with one extent',
    subformat: 'twoGbMaxExtentFlat',
    make: (p) => {
      const f = p('split-flat.vmdk');
      qemuImg(['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat', f, '4M']);
      qemuIo(f, 'vmdk', ['write -P 0x07 1M 64k']);
      return f;
    },
  },
  {
    name: 'backing vmdk with a vmdk parent',
    subformat: 'monolithicSparse',
    layers: 2,
    make: (p) => {
      const parent = p('parent.vmdk');
      const child = p('child.vmdk');
      qemuImg(['create', '-f', 'vmdk', parent, '16M']);
      qemuIo(parent, 'vmdk', ['write -P 0x22 0 1M', 'write -P 0x23 8M 64k']);
      qemuImg(['create', '-f', 'vmdk', '-b', 'parent.vmdk', '-F', 'vmdk', child]);
      qemuIo(child, 'vmdk', ['write -P 0x33 512k 64k', 'write -P 0x34 12M 4k']);
      return child;
    },
  },
  {
    name: 'odd capacity (1000448 bytes)',
    subformat: 'monolithicSparse',
    make: (p) => {
      const f = p('odd.vmdk');
      qemuImg(['create', '-f', 'vmdk', f, '1000448']);
      qemuIo(f, 'vmdk', ['write -P 0x44 0 4k', 'write -P 0x45 983040 17408']);
      return f;
    },
  },
  {
    name: 'compat6, lsilogic',
    subformat: 'monolithicSparse',
    make: (p) => {
      const f = p('compat6.vmdk');
      qemuImg(['create', '-f', 'vmdk', '-o', 'compat6=on,adapter_type=lsilogic', f, '8M']);
      qemuIo(f, 'vmdk', ['write -P 0x55 4M 64k']);
      return f;
    },
  },
  {
    name: 'hwversion=10',
    subformat: 'monolithicSparse',
    make: (p) => {
      const f = p('hw10.vmdk');
      qemuImg(['create', '-f', 'vmdk', '-o', 'hwversion=10', f, '8M']);
      qemuIo(f, 'vmdk', ['write -P 0x56 0 64k']);
      return f;
    },
  },
];

describe.runIf(run)('vmdk against qemu-img', () => {
  const files = new Map<string, string>();
  beforeAll(() => {
    for (const v of variants) files.set(v.name, v.make(tmp.path));
  });
  afterAll(() => tmp.cleanup());

  for (const v of variants) {
    describe(v.name, () => {
      it('matches qemu-img info, map, content and check', async () => {
        const f = files.get(v.name)!;
        const chain = await openVmdk(f);
        try {
          expect(chain.probed).toBe(true);
          expect(chain.layers.length).toBe(v.layers ?? 1);
          const top = chain.layers[0]!;
          expect(top.format).toBe('vmdk');
          expect(top.info.subformat).toBe(v.subformat);
          const qi = qemuInfo(f);
          expect(top.info.virtualSize).toBe(qi['virtual-size']);
          const qdata = (qi['format-specific'] as { data: Record<string, unknown> }).data;
          expect(top.info.details.cid).toBe(qdata.cid);
          expect(top.info.details['parent-cid']).toBe(qdata['parent-cid']);
          expect(top.info.details['create-type']).toBe(qdata['create-type']);
          if (qi['cluster-size'] !== undefined) expect(top.info.clusterSize).toBe(qi['cluster-size']);

          expect(normaliseMap(await ourMap(chain))).toEqual(normaliseMap(qemuMap(f)));
          expect(await ourSha(chain)).toBe(qemuRawSha(f, tmp.path(`${v.name.replace(/\W+/g, '_')}.raw`)));

          for (const layer of chain.layers) {
            const hs = await layer.hostSpace();
            expect(hs.ranges().length).toBeGreaterThan(0);
            const r = await layer.check();
            expect(r.corruptions).toBe(0);
            expect(r.leaks).toBe(0);
          }
          const qc = qemuImgStatus(['check', f]);
          expect(qc.status).toBe(0);
        } finally {
          await chain.close();
        }
      });
    });
  }

  it('reports backing details: filename, format vmdk, CID link', async () => {
    const chain = await openVmdk(files.get('backing vmdk with a vmdk parent')!);
    try {
      const [child, parent] = chain.layers;
      expect(child!.info.backing).toEqual({ filename: 'parent.vmdk', format: 'vmdk' });
      expect(child!.info.details['parent-cid']).toBe(parent!.info.details.cid);
    } finally {
      await chain.close();
    }
  });

  it('maps zeroed grains as zero and data grains at sector offsets', async () => {
    const chain = await openVmdk(files.get('zeroed_grain=on (v2)')!);
    try {
      const top = chain.layers[0]!;
      expect(top.info.details.version).toBe(2);
      expect(top.info.details['zeroed-grain']).toBe(true);
      expect(top.info.features).toContain('zeroed grains');
      const kinds = (await top.mapping()).toArray().map((e) => e.kind);
      expect(kinds).toContain('zero');
      expect(kinds).toContain('data');
    } finally {
      await chain.close();
    }
  });

  it('streamOptimized: compressed extents inflate to the grain; hostSpace records markers', async () => {
    const chain = await openVmdk(files.get('streamOptimized')!);
    try {
      const top = chain.layers[0]! as SparseImage;
      expect(top.info.details.compressed).toBe(true);
      const map = await top.mapping();
      const comp = map.toArray().filter((e) => e.kind === 'compressed');
      expect(comp.length).toBeGreaterThan(0);
      const bytes = await top.readCompressed(comp[0]!);
      expect(bytes.length).toBe(65536);
      const hs = await top.hostSpace();
      const whats = new Set(hs.ranges().map((r) => r.what));
      expect(whats).toContain('grain marker');
      expect(whats).toContain('compressed data');
      expect(whats).toContain('redundant grain directory');
      const r = await top.check();
      expect(r.compressedClusters).toBe(comp.length);
    } finally {
      await chain.close();
    }
  });

  it('info details: adapter type, hw version, geometry', async () => {
    const chain = await openVmdk(files.get('compat6, lsilogic')!);
    try {
      const d = chain.layers[0]!.info.details;
      expect(d['adapter-type']).toBe('lsilogic');
      expect(d['hw-version']).toBe('6');
      expect(d.geometry).toMatch(/^\d+\/\d+\/\d+$/);
    } finally {
      await chain.close();
    }
    const chain2 = await openVmdk(files.get('hwversion=10')!);
    try {
      expect(chain2.layers[0]!.info.details['hw-version']).toBe('10');
    } finally {
      await chain2.close();
    }
  });

  it('monolithicFlat: the extent is one data run into the -flat file (holes show in map as zero:true)', async () => {
    const chain = await openVmdk(files.get('monolithicFlat')!);
    try {
      const top = chain.layers[0]!;
      expect(top.dataFile).toBe('flat-flat.vmdk');
      const map = (await top.mapping()).toArray();
      expect(map).toEqual([{ guest: 0, length: top.info.virtualSize, kind: 'data', host: 0 }]);
      const hs = await top.hostSpace();
      expect(hs.ranges()).toEqual([{ start: 0, length: readFileSync(files.get('monolithicFlat')!).length, role: 'header', what: 'descriptor', shared: false }]);
    } finally {
      await chain.close();
    }
  });

  it('refuses twoGbMaxExtentSparse with an UnsupportedError naming the createType and qemu-img convert', async () => {
    const f = tmp.path('split.vmdk');
    qemuImg(['create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', f, '8M']);
    const err = await openVmdk(f).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UnsupportedError);
    expect((err as Error).message).toContain('twoGbMaxExtentSparse');
    expect((err as Error).message).toContain('qemu-img convert');
  });

  it('detects a parent whose CID changed (QEMU refuses to read through it)', async () => {
    const parent = tmp.path('cidparent.vmdk');
    const child = tmp.path('cidchild.vmdk');
    qemuImg(['create', '-f', 'vmdk', parent, '4M']);
    qemuImg(['create', '-f', 'vmdk', '-b', 'cidparent.vmdk', '-F', 'vmdk', child]);
    // Opening the parent read-write and writing bumps its CID.
    const before = (await openVmdk(parent)).layers[0]!.info.details.cid;
    copyFileSync(parent, tmp.path('cidparent.orig'));
    qemuIo(parent, 'vmdk', ['write -P 1 0 4k']);
    const after = qemuInfo(parent)['format-specific'] as { data: { cid: number } };
    expect(after.data.cid).not.toBe(before);
    const err = await openVmdk(child).catch((e: unknown) => e);
    expect((err as { field?: string }).field).toBe('parentCID');
    // QEMU agrees: reading unallocated child data fails.
    expect(qemuImgStatus(['convert', '-O', 'raw', child, tmp.path('cid.raw')]).status).not.toBe(0);
  });
});
