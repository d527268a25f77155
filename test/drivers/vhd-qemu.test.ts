/**
 * VHD against the real qemu-img 7.2 (-f vpc): images made by qemu-img/qemu-io, compared on virtual
 * size, `qemu-img map`, guest content (sha256 of `qemu-img convert -O raw`) and check().
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { GuestReader } from '../../src/guest.js';
import { mapChain } from '../../src/map.js';
import { checkImage } from '../../src/check.js';
import { decodeFooter, geometryForSize, geometrySectors, qemuCreateSize, vhdDriver, DISK_FIXED } from '../../drivers/vhd/index.js';
import { normaliseMap, parseMapJson } from '../support/qemu-map.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';
import { buildDynamic, buildFixed, openVhd, qemuJson, qemuRawSha } from './vhd-support.js';

const run = qemuAvailable();
const tmp = withTmpDir('imgconv-vhd-');
afterAll(() => tmp.cleanup());

const MiB = 1024 * 1024;

interface Variant {
  name: string;
  size: number;
  options?: string;
  subformat: 'fixed' | 'dynamic';
  /** Compare the whole guest content's hash (the huge sparse one checks the written regions instead). */
  content?: boolean;
}

const variants: Variant[] = [
  { name: 'dynamic 100 MiB (default subformat)', size: 100 * MiB, subformat: 'dynamic', content: true },
  { name: 'dynamic 1000448 bytes', size: 1000448, subformat: 'dynamic', content: true },
  { name: 'dynamic 100 MiB + 7 sectors', size: 100 * MiB + 7 * 512, subformat: 'dynamic', content: true },
  { name: 'dynamic force_size=on, 100 MiB + 7 sectors', size: 100 * MiB + 7 * 512, options: 'force_size=on', subformat: 'dynamic', content: true },
  { name: 'dynamic force_size=on, 3 MiB + 1 sector', size: 3 * MiB + 512, options: 'force_size=on', subformat: 'dynamic', content: true },
  { name: 'fixed 20 MiB', size: 20 * MiB, options: 'subformat=fixed', subformat: 'fixed', content: true },
  { name: 'fixed 1000448 bytes', size: 1000448, options: 'subformat=fixed', subformat: 'fixed', content: true },
  { name: 'fixed force_size=on, 5 MiB + 3 sectors', size: 5 * MiB + 1536, options: 'subformat=fixed,force_size=on', subformat: 'fixed', content: true },
  { name: 'dynamic 130 GiB (beyond CHS: maximum geometry, current_size)', size: 130 * 1024 * MiB, subformat: 'dynamic' },
];

describe.runIf(run)('VHD images made by qemu-img', () => {
  for (const v of variants) {
    describe(v.name, () => {
      const f = tmp.path(`${v.name.replace(/[^a-z0-9]+/gi, '_')}.vhd`);
      let vs = 0;
      it('creates and writes with qemu', () => {
        qemuImg(['create', '-f', 'vpc', ...(v.options ? ['-o', v.options] : []), f, String(v.size)]);
        vs = (qemuJson(['info', '--output=json', '-f', 'vpc', f]) as { 'virtual-size': number })['virtual-size'];
        const last = vs - 512;
        qemuIo(f, 'vpc', ['write -P 0xab 0 64k', `write -P 0xcd ${Math.floor(vs / 3 / 512) * 512} 4k`, `write -P 0x5a ${Math.floor(vs / 2 / 512) * 512 - 1024} 3k`, `write -P 0xee ${last} 512`]);
      });

      it('has qemu-img’s virtual size, subformat and the create size it predicts', async () => {
        const chain = await openVhd(f);
        try {
          const info = chain.layers[0]!.info;
          expect(chain.probed).toBe(true);
          expect(info.format).toBe('vhd');
          expect(info.virtualSize).toBe(vs);
          expect(info.subformat).toBe(v.subformat);
          const predicted = qemuCreateSize(v.size, (v.options ?? '').includes('force_size=on'));
          expect(predicted.virtualSize).toBe(vs);
          expect(info.details.geometry).toBe(`${predicted.geometry.cylinders}/${predicted.geometry.heads}/${predicted.geometry.sectorsPerTrack}`);
          expect(info.details['creator-app']).toBe(predicted.creatorApp);
          if (v.subformat === 'dynamic') expect(info.clusterSize).toBe(2 * MiB);
          expect(info.dirty).toBe(false);
        } finally {
          await chain.close();
        }
      });

      it('maps like qemu-img map', async () => {
        const chain = await openVhd(f);
        try {
          const ours = normaliseMap(await mapChain(chain));
          const theirs = normaliseMap(parseMapJson(qemuImg(['map', '--output=json', '-f', 'vpc', f])));
          expect(ours).toEqual(theirs);
        } finally {
          await chain.close();
        }
      });

      it(v.content ? 'reads the guest content qemu-img convert produces' : 'reads the written patterns and zeros around them (disk too large to hash whole)', async () => {
        const chain = await openVhd(f);
        try {
          const reader = await GuestReader.create(chain);
          if (v.content) {
            expect(await reader.sha256()).toBe(qemuRawSha(f, `${f}.raw`));
            return;
          }
          const third = Math.floor(vs / 3 / 512) * 512;
          const half = Math.floor(vs / 2 / 512) * 512 - 1024;
          const expectFill = async (off: number, len: number, byte: number) => {
            const got = await reader.read(off, len);
            expect(got.every((b) => b === byte), `guest ${off}+${len} should all be 0x${byte.toString(16)}`).toBe(true);
          };
          await expectFill(0, 65536, 0xab);
          await expectFill(65536, 65536, 0);
          await expectFill(third, 4096, 0xcd);
          await expectFill(third + 4096, 8192, 0);
          await expectFill(half - 4096, 4096, 0);
          await expectFill(half, 3072, 0x5a);
          await expectFill(vs - 4096, 3584, 0);
          await expectFill(vs - 512, 512, 0xee);
        } finally {
          await chain.close();
        }
      });

      it('checks clean, and qemu-img has no check for vpc', async () => {
        const chain = await openVhd(f);
        try {
          const r = await checkImage(chain.layers[0]!);
          expect(r.messages).toEqual([]);
          expect(r.corruptions).toBe(0);
          expect(r.leaks).toBe(0);
          const hs = await chain.layers[0]!.hostSpace();
          expect(hs.free()).toEqual([]);
          if (v.subformat === 'fixed') expect(hs.ranges().map((x) => x.what)).toEqual(['data', 'footer']);
        } finally {
          await chain.close();
        }
        const q = qemuImgStatus(['check', '-f', 'vpc', f]);
        expect(q.stderr).toMatch(/does not support checks/);
      });
    });
  }
});

describe.runIf(run)('geometry against qemu-img create', () => {
  // Odd sizes, CHS-exact sizes, sizes in each of the 17/31/63/255-sector ranges.
  const sizes = [512, 4096, 65536, 1000448, 3 * MiB + 512, 31 * MiB + 1234, 127 * MiB, 511 * MiB + 512, 1023 * MiB, 4095 * MiB, 32 * 1024 * MiB + 512, 127 * 1024 * MiB, 127.5 * 1024 * MiB];
  for (const size of sizes) {
    for (const force of [false, true]) {
      it(`size ${size}${force ? ', force_size=on' : ''}: footer geometry and virtual size`, () => {
        const f = tmp.path(`geo-${size}-${force}.vhd`);
        qemuImg(['create', '-f', 'vpc', '-o', `subformat=dynamic${force ? ',force_size=on' : ''}`, f, String(size)]);
        const ftr = decodeFooter(new Uint8Array(readFileSync(f).subarray(0, 512)));
        const want = qemuCreateSize(size, force);
        expect(ftr.geometry).toEqual(want.geometry);
        expect(ftr.creatorApp).toBe(want.creatorApp);
        const vs = (qemuJson(['info', '--output=json', '-f', 'vpc', f]) as { 'virtual-size': number })['virtual-size'];
        expect(vs).toBe(want.virtualSize);
      });
    }
  }

  // Footers qemu-img does not write: the spec's geometry (rounded down) with creators QEMU sizes by
  // CHS ("vpc ", "qemu") or by current_size ("win ", "tap\0", ...), current_size not CHS-exact.
  const creators = ['vpc ', 'qemu', 'win ', 'qem2', 'd2v ', 'CTXS', 'tap\0', 'vs  ', 'd2v\0', 'wa\0\0'];
  const odd = [1000448, 100 * MiB + 3584, 6 * MiB + 1000, 2 * 1024 * MiB + 7 * 512];
  for (const creatorApp of creators) {
    for (const size of odd) {
      it(`creator ${JSON.stringify(creatorApp)}, current_size ${size}: qemu-img info agrees`, async () => {
        const f = tmp.path(`crafted-${size}-${creatorApp.replace(/\W/g, '_')}.vhd`);
        const data = Math.ceil(size / 512) * 512;
        writeFileSync(f, buildFixed(0, { currentSize: size, creatorApp, geometry: geometryForSize(size) }).subarray(0, 512));
        // data area of `data` bytes (sparse), then the footer
        const ftr = readFileSync(f);
        truncateSync(f, 0);
        truncateSync(f, data);
        writeFileSync(f, ftr, { flag: 'a' });
        const vs = (qemuJson(['info', '--output=json', '-f', 'vpc', f]) as { 'virtual-size': number })['virtual-size'];
        const chain = await openVhd(f, { format: 'vhd' });
        try {
          expect(chain.layers[0]!.info.virtualSize).toBe(vs);
          expect(chain.layers[0]!.info.subformat).toBe('fixed');
        } finally {
          await chain.close();
        }
      });
    }
  }
});

describe.runIf(run)('dynamic VHDs qemu-img does not make (built here)', () => {
  // Non-default block sizes, blocks placed out of guest order, partial bitmaps (QEMU ignores them),
  // a partial last block, creators sized by CHS and by current_size.
  const cases = [
    { blockSize: 4096, virtualSize: 1 * MiB + 3 * 512, creatorApp: 'qem2' },
    { blockSize: 64 * 1024, virtualSize: 3 * MiB, creatorApp: 'win ' },
    { blockSize: 1 * MiB, virtualSize: 10 * MiB + 512, creatorApp: 'tap\0' },
    { blockSize: 512 * 1024, virtualSize: geometrySectors(geometryForSize(6 * MiB)) * 512, creatorApp: 'vpc ', geometry: geometryForSize(6 * MiB) },
  ];
  for (const c of cases) {
    it(`block size ${c.blockSize}, ${c.virtualSize} bytes, creator ${JSON.stringify(c.creatorApp)}: same size, map and content as qemu-img`, async () => {
      const n = Math.ceil(c.virtualSize / c.blockSize);
      const fill = (k: number) => {
        const b = new Uint8Array(c.blockSize);
        for (let i = 0; i < b.length; i++) b[i] = (k * 13 + i * 7 + (i >> 9)) & 0xff;
        return b;
      };
      const chosen = [0, 1, Math.floor(n / 2), n - 1].filter((k, i, a) => a.indexOf(k) === i);
      const blocks = new Map(chosen.map((k, i) => [k, { data: fill(k), ...(i % 2 ? { present: [0, 3] } : {}) }]));
      const built = buildDynamic({ virtualSize: c.virtualSize, blockSize: c.blockSize, creatorApp: c.creatorApp, ...(c.geometry ? { geometry: c.geometry } : {}), blocks, hostOrder: [...chosen].reverse() });
      const f = tmp.path(`built-${c.blockSize}.vhd`);
      writeFileSync(f, built.bytes);
      const vs = (qemuJson(['info', '--output=json', '-f', 'vpc', f]) as { 'virtual-size': number })['virtual-size'];
      const chain = await openVhd(f);
      try {
        expect(chain.layers[0]!.info.virtualSize).toBe(vs);
        expect(normaliseMap(await mapChain(chain))).toEqual(normaliseMap(parseMapJson(qemuImg(['map', '--output=json', '-f', 'vpc', f]))));
        expect(await (await GuestReader.create(chain)).sha256()).toBe(qemuRawSha(f, `${f}.raw`));
        const r = await checkImage(chain.layers[0]!);
        expect([r.corruptions, r.leaks, r.fragmentedClusters]).toEqual([0, 0, chosen.length - 1]);
      } finally {
        await chain.close();
      }
    });
  }
});

describe.runIf(run)('probing', () => {
  it('claims dynamic (cookie at 0) and fixed (footer at the end) images; qemu probes fixed VHDs as raw', async () => {
    const d = tmp.path('probe-d.vhd');
    const fx = tmp.path('probe-f.vhd');
    qemuImg(['create', '-f', 'vpc', d, '4M']);
    qemuImg(['create', '-f', 'vpc', '-o', 'subformat=fixed', fx, '4M']);
    for (const p of [d, fx]) {
      const chain = await openVhd(p);
      expect(chain.probed).toBe(true);
      expect(chain.layers[0]!.format).toBe('vhd');
      await chain.close();
    }
    expect((qemuJson(['info', '--output=json', d]) as { format: string }).format).toBe('vpc');
    expect((qemuJson(['info', '--output=json', fx]) as { format: string }).format).toBe('raw');
    const bytes = new Uint8Array(readFileSync(fx));
    expect(vhdDriver.probe({ head: bytes.subarray(0, 65536), tail: bytes.subarray(bytes.length - 512), size: bytes.length, path: fx })).toBe(100);
    expect(decodeFooter(bytes.subarray(bytes.length - 512)).diskType).toBe(DISK_FIXED);
  });
});
