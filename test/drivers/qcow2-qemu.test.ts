/**
 * qcow2 against the real qemu-img: for each variant, virtual size, the chain's map, the guest
 * content hash and the check report (corruptions, leaks, and the cluster statistics) must equal
 * qemu-img's; the host-space map must build without overlaps. Images are opened through
 * NoWriteDevice, so any write on the read path fails the test.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { UnsupportedError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import type { ImageChain } from '../../src/image.js';
import { qemuAvailable, qemuIo as qemuIoRaw, withTmpDir } from '../support/qemu.js';
import {
  normaliseMap,
  openQcow2Chain,
  ourCheckShape,
  ourMap,
  ourSha,
  qemuCheck,
  qemuInfo,
  qemuMap,
  qemuImg,
  qemuIoIn,
  qemuRawSha,
  storedRefcounts,
} from './qcow2-support.js';

const qemuIo = (file: string, format: string, cmds: string[]) => {
  if (format === 'qcow2') qemuIoIn(file, cmds);
  else qemuIoRaw(file, format, cmds);
};

const haveQemu = qemuAvailable();
const tmp = withTmpDir('imgconv-qcow2-');

/** A mixed workload: data, zero writes, a discard, and data past the first L2 table's reach for small clusters. */
function workload(size: number): string[] {
  const cmds = ['write -P 0xa1 0 64k', 'write -P 0xb2 200k 12k', 'write -z 320k 128k', 'write -P 0xc3 512k 64k', 'discard 512k 32k'];
  if (size > 8 << 20) cmds.push(`write -P 0xd4 ${size - (3 << 20)} 1M`);
  return cmds;
}

function create(name: string, size: number | string, opts: string[] = [], extra: string[] = []): string {
  const p = tmp.path(name);
  qemuImg(['create', '-q', '-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), ...extra, p, String(size)], tmp.dir);
  return p;
}

/** Variants: a name and a builder returning the path of the top image. */
const variants: [string, () => string][] = [
  ['cluster 512', () => { const p = create('c512.qcow2', 4 << 20, ['cluster_size=512']); qemuIo(p, 'qcow2', workload(4 << 20)); return p; }],
  ['cluster 4k', () => { const p = create('c4k.qcow2', 16 << 20, ['cluster_size=4k']); qemuIo(p, 'qcow2', workload(16 << 20)); return p; }],
  ['cluster 64k', () => { const p = create('c64k.qcow2', 64 << 20); qemuIo(p, 'qcow2', workload(64 << 20)); return p; }],
  ['cluster 2M', () => { const p = create('c2m.qcow2', 64 << 20, ['cluster_size=2M']); qemuIo(p, 'qcow2', workload(64 << 20)); return p; }],
  ['compat 0.10', () => { const p = create('v2.qcow2', 16 << 20, ['compat=0.10']); qemuIo(p, 'qcow2', workload(16 << 20)); return p; }],
  ['compat 0.10 with a snapshot', () => {
    const p = create('v2snap.qcow2', 8 << 20, ['compat=0.10', 'cluster_size=4k']);
    qemuIo(p, 'qcow2', ['write -P 0x12 0 64k']);
    qemuImg(['snapshot', '-c', 'old', p]);
    qemuIo(p, 'qcow2', ['write -P 0x13 16k 8k', 'write -P 0x14 4M 4k']);
    return p;
  }],
  ['compressed with a snapshot and an overwrite', () => {
    const raw = tmp.path('cs-src.raw');
    qemuImg(['create', '-q', '-f', 'raw', raw, String(1 << 20)]);
    qemuIo(raw, 'raw', ['write -P 0x15 0 192k']);
    const p = tmp.path('csnap.qcow2');
    qemuImg(['convert', '-q', '-c', '-O', 'qcow2', '-o', 'cluster_size=16k', raw, p]);
    qemuImg(['snapshot', '-c', 'c', p]);
    qemuIo(p, 'qcow2', ['write -P 0x16 16k 4k']);
    return p;
  }],
  ['refcount_bits 1', () => { const p = create('rc1.qcow2', 16 << 20, ['refcount_bits=1']); qemuIo(p, 'qcow2', workload(16 << 20)); return p; }],
  ['refcount_bits 64', () => { const p = create('rc64.qcow2', 16 << 20, ['refcount_bits=64']); qemuIo(p, 'qcow2', workload(16 << 20)); return p; }],
  ['lazy refcounts', () => { const p = create('lazy.qcow2', 16 << 20, ['lazy_refcounts=on']); qemuIo(p, 'qcow2', workload(16 << 20)); return p; }],
  ['preallocation=metadata', () => { const p = create('pm.qcow2', 8 << 20, ['preallocation=metadata', 'cluster_size=16k']); qemuIo(p, 'qcow2', workload(8 << 20)); return p; }],
  ['preallocation=falloc', () => { const p = create('pf.qcow2', 4 << 20, ['preallocation=falloc']); qemuIo(p, 'qcow2', ['write -P 0x11 64k 64k', 'write -z 1M 64k']); return p; }],
  ['extended L2', () => {
    const p = create('ext.qcow2', 16 << 20, ['extended_l2=on', 'cluster_size=64k']);
    qemuIo(p, 'qcow2', ['write -P 0x21 0 2k', 'write -P 0x22 6k 4k', 'write -z 72k 8k', 'write -P 0x23 1M 64k', 'write -z 1M 2k', 'discard 1056768 4k', 'write -P 0x24 3M 512']);
    return p;
  }],
  ['extended L2, preallocation=metadata', () => { const p = create('extpm.qcow2', 4 << 20, ['extended_l2=on', 'preallocation=metadata']); qemuIo(p, 'qcow2', ['write -P 0x25 4k 4k']); return p; }],
  ['compressed (convert -c)', () => {
    const raw = tmp.path('comp-src.raw');
    qemuImg(['create', '-q', '-f', 'raw', raw, String(8 << 20)]);
    qemuIo(raw, 'raw', ['write -P 0x31 0 256k', 'write -P 0x32 1M 64k', 'write -P 0x33 3146240 8k']);
    // A random (incompressible) cluster too: qemu stores it uncompressed.
    const bytes = readFileSync(raw);
    for (let i = 0; i < 65536; i++) bytes[(5 << 20) + i] = (i * 2654435761) >>> 24;
    writeFileSync(raw, bytes);
    const p = tmp.path('comp.qcow2');
    qemuImg(['convert', '-q', '-c', '-O', 'qcow2', raw, p]);
    qemuIo(p, 'qcow2', ['write -P 0x34 1052672 4k']);
    return p;
  }],
  ['compressed, 4k clusters', () => {
    const raw = tmp.path('comp4-src.raw');
    qemuImg(['create', '-q', '-f', 'raw', raw, String(2 << 20)]);
    qemuIo(raw, 'raw', ['write -P 0x35 0 100k', 'write -P 0x36 1M 3k']);
    const p = tmp.path('comp4.qcow2');
    qemuImg(['convert', '-q', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', raw, p]);
    return p;
  }],
  ['qcow2 backing', () => {
    const base = create('base.qcow2', 16 << 20);
    qemuIo(base, 'qcow2', ['write -P 0x41 0 1M', 'write -P 0x42 4M 64k']);
    const top = create('top.qcow2', 16 << 20, [], ['-b', 'base.qcow2', '-F', 'qcow2']);
    qemuIo(top, 'qcow2', ['write -P 0x43 64k 64k', 'write -z 128k 64k', 'discard 4M 64k']);
    return top;
  }],
  ['raw backing', () => {
    const base = tmp.path('base.raw');
    qemuImg(['create', '-q', '-f', 'raw', base, String(4 << 20)]);
    qemuIo(base, 'raw', ['write -P 0x51 0 512k']);
    const top = create('overraw.qcow2', 4 << 20, [], ['-b', 'base.raw', '-F', 'raw']);
    qemuIo(top, 'qcow2', ['write -P 0x52 64k 64k']);
    return top;
  }],
  ['backing smaller than the overlay', () => {
    const base = create('smallbase.qcow2', 1 << 20);
    qemuIo(base, 'qcow2', ['write -P 0x53 0 1M']);
    const top = create('bigtop.qcow2', 4 << 20, [], ['-b', 'smallbase.qcow2', '-F', 'qcow2']);
    qemuIo(top, 'qcow2', ['write -P 0x54 2M 64k']);
    return top;
  }],
  ['odd virtual size 1000448', () => { const p = create('odd.qcow2', 1000448); qemuIo(p, 'qcow2', ['write -P 0x61 0 64k', 'write -P 0x62 983040 17408']); return p; }],
  // 1 GiB + 512 with 64 KiB clusters has a last L2 table covering only 512 bytes; the same shape at
  // 4 KiB clusters (2 MiB per L2 table) keeps the content comparison fast.
  ['32 MiB + 512, 4k clusters (last L2 maps 512 bytes)', () => { const p = create('g512.qcow2', 2 ** 25 + 512, ['cluster_size=4k']); qemuIo(p, 'qcow2', ['write -P 0x63 32M 512', 'write -P 0x64 0 4k']); return p; }],
  ['1 GiB + 512 (map and check)', () => { const p = create('g1g.qcow2', 2 ** 30 + 512); qemuIo(p, 'qcow2', ['write -P 0x65 1G 512', 'write -P 0x66 0 4k']); return p; }],
  ['internal snapshot', () => {
    const p = create('snap.qcow2', 16 << 20);
    qemuIo(p, 'qcow2', ['write -P 0x71 0 256k', 'write -P 0x72 8M 64k']);
    qemuImg(['snapshot', '-c', 's1', p]);
    qemuIo(p, 'qcow2', ['write -P 0x73 64k 64k', 'write -P 0x74 12M 64k', 'discard 8M 64k']);
    qemuImg(['snapshot', '-c', 's2', p]);
    qemuIo(p, 'qcow2', ['write -P 0x75 0 4k']);
    return p;
  }],
  ['bitmap', () => {
    const p = create('bm.qcow2', 16 << 20);
    qemuIo(p, 'qcow2', ['write -P 0x81 0 64k']);
    qemuImg(['bitmap', '--add', p, 'b0']);
    qemuImg(['bitmap', '--add', '-g', '64k', p, 'b1']);
    return p;
  }],
  ['external data file', () => { const p = create('df.qcow2', 4 << 20, ['data_file=df.raw']); qemuIo(p, 'qcow2', ['write -P 0x91 0 64k', 'write -P 0x92 1M 4k', 'write -z 2M 64k']); return p; }],
  ['data_file_raw', () => { const p = create('dfr.qcow2', 4 << 20, ['data_file=dfr.raw', 'data_file_raw=on']); qemuIo(p, 'qcow2', ['write -P 0x93 64k 64k']); return p; }],
  ['dirty bit set by hand', () => {
    const p = create('dirty.qcow2', 4 << 20);
    qemuIo(p, 'qcow2', ['write -P 0xa1 0 64k']);
    const b = readFileSync(p);
    b[79] = b[79]! | 1;
    writeFileSync(p, b);
    return p;
  }],
];

describe.skipIf(!haveQemu)('qcow2 against qemu-img', () => {
  const built = new Map<string, string>();
  beforeAll(() => {
    for (const [name, build] of variants) built.set(name, build());
  });
  afterAll(() => tmp.cleanup());

  for (const [name] of variants) {
    describe(name, () => {
      let chain: ImageChain;
      beforeAll(async () => {
        chain = await openQcow2Chain(built.get(name)!);
      });
      afterAll(async () => chain?.close());

      test('virtual size', () => {
        expect(chain.layers[0]!.info.virtualSize).toBe(qemuInfo(built.get(name)!)['virtual-size']);
      });
      test('map equals qemu-img map', async () => {
        expect(normaliseMap(await ourMap(chain))).toEqual(normaliseMap(qemuMap(built.get(name)!)));
      });
      if (name.startsWith('1 GiB')) {
        // Hashing 1 GiB takes seconds (the 32 MiB + 512 variant compares whole contents): read the written parts.
        test('guest content at the written places', async () => {
          const r = await GuestReader.create(chain);
          expect(await r.read(0, 4096)).toEqual(new Uint8Array(4096).fill(0x66));
          expect(await r.read(2 ** 30 - 512, 1024)).toEqual(Uint8Array.from({ length: 1024 }, (_, i) => (i < 512 ? 0 : 0x65)));
        });
      } else {
        test('guest content equals qemu-img convert', async () => {
          expect(await ourSha(chain)).toBe(qemuRawSha(built.get(name)!, tmp.path(`${name.replace(/\W/g, '_')}.raw-out`)));
        });
      }
      test('check equals qemu-img check (clean)', async () => {
        const ours = ourCheckShape(await chain.layers[0]!.check());
        const theirs = qemuCheck(built.get(name)!);
        expect(ours).toEqual(theirs);
        expect(ours.corruptions + ours.leaks).toBe(0);
      });
      test('host space covers exactly the clusters with a refcount', async () => {
        const hs = await chain.layers[0]!.hostSpace();
        const bytes = new Uint8Array(readFileSync(built.get(name)!));
        const cs = chain.layers[0]!.info.clusterSize!;
        const covered = new Set<number>();
        for (const r of hs.ranges()) {
          for (let k = Math.floor(r.start / cs); k * cs < r.start + r.length; k++) covered.add(k);
        }
        const refcounted = storedRefcounts(bytes).flatMap((rc, k) => (rc > 0 ? [k] : []));
        expect([...covered].filter((k) => k * cs < bytes.length).sort((a, b) => a - b)).toEqual(refcounted);
        expect(hs.totals().header).toBe(cs);
      });
    });
  }
});
