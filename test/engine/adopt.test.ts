/**
 * Images whose data lives in another file → raw by adopting that file (src/engine/adopt.ts): qcow2 with
 * an external data file (data_file_raw on and off, zeros marked over stale bytes, data files shorter and
 * longer than the disk) and VMDK monolithicFlat, made and written by QEMU and judged by qemu-img (compare
 * identical to the image as it was, info probing raw, the virtual size kept, the data file's name gone);
 * refusals byte-identical; and every operation of an adoption killed, lost to power, or failed with an
 * I/O error: the file at the image's path is always the valid source or the raw disk, same guest SHA-256.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, readFileSync, readdirSync, statSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { fileStorage, type MemoryStorage } from '../../src/blockdev/storage.js';
import { ConversionFailedError, convertInPlace, planConversion } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { recover, RecoveryRefusedError } from '../../src/engine/recover.js';
import { ImgconvError, UnsupportedError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import { openImage, probe } from '../../src/image.js';
import { FaultyStorage, memoryStorageOf, powerLossChoices, powerLossCuts, powerLossState, prng, RecordingStorage, stateAfter, type Files } from '../support/recording.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';

const haveQemu = qemuAvailable();
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** qemu-img / qemu-io in the images' directory: QEMU 7.2 resolves a relative data file name from there. */
function q(dir: string, cmd: 'qemu-img' | 'qemu-io', args: string[]): { status: number; out: string } {
  const r = spawnSync(cmd, args, { cwd: dir, encoding: 'utf8' });
  return { status: r.status ?? -1, out: r.stdout + r.stderr };
}
function qOk(dir: string, cmd: 'qemu-img' | 'qemu-io', args: string[]): string {
  const r = q(dir, cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.out}`);
  return r.out;
}
const io = (dir: string, fmt: string, file: string, cmds: string[]) => qOk(dir, 'qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file]);

interface Made {
  dir: string;
  image: string;
  dataFile: string;
  qfmt: string;
  vsize: number;
  /** The guest disk as qemu-img reads it before the conversion (qemu-img convert -O raw). */
  expected: string;
  cleanup: () => void;
}

type Kind = 'qcow2-raw' | 'qcow2-stale' | 'qcow2-short' | 'qcow2-long' | 'vmdk-flat';

/** Images made and written by QEMU. */
function make(kind: Kind): Made {
  const t = withTmpDir('imgconv-adopt-');
  const M = 1 << 20;
  const vsize = 16 * M;
  let image = 'disk.qcow2';
  let dataFile = 'd.raw';
  let qfmt = 'qcow2';
  if (kind === 'vmdk-flat') {
    image = 'disk.vmdk';
    dataFile = 'disk-flat.vmdk';
    qfmt = 'vmdk';
    qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', image, String(vsize)]);
    io(t.dir, 'vmdk', image, ['write -P 0x11 0 1M', 'write -P 0x12 7M 64k', 'write -P 0x13 16320k 64k']);
  } else {
    const opts = kind === 'qcow2-raw' ? 'data_file=d.raw,data_file_raw=on' : 'data_file=d.raw';
    qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, image, String(vsize)]);
    if (kind === 'qcow2-short') {
      // Written only at its start, and the data file cut after that (QEMU reads zeros past its end).
      io(t.dir, 'qcow2', image, ['write -P 0x21 0 1M', 'write -z 256k 64k']);
      truncateSync(t.path(dataFile), M);
    } else {
      io(t.dir, 'qcow2', image, ['write -P 0x31 0 1M', 'write -P 0x32 5M 256k', 'write -P 0x33 15M 1M']);
      // Zeros marked over data: the data file keeps the stale bytes (with data_file_raw=on QEMU zeroes them).
      io(t.dir, 'qcow2', image, ['write -z 64k 128k', 'write -z 5M 64k']);
    }
    if (kind === 'qcow2-long') {
      // Bytes past the disk's end in the data file, which the image never reads.
      const p = t.path(dataFile);
      truncateSync(p, vsize + 3 * M);
      const fd = execFileSync('sh', ['-c', `printf 'TRAILING' | dd of=${dataFile} bs=1 seek=${vsize + M} conv=notrunc 2>/dev/null; echo ok`], { cwd: t.dir, encoding: 'utf8' });
      expect(fd.trim()).toBe('ok');
    }
  }
  qOk(t.dir, 'qemu-img', ['convert', '-f', qfmt, '-O', 'raw', image, 'expected.raw']);
  return { dir: t.dir, image: t.path(image), dataFile: t.path(dataFile), qfmt, vsize, expected: t.path('expected.raw'), cleanup: t.cleanup };
}

/** Stale bytes: the data file differs from the guest disk where the image reads zeros. */
function dataFileDiffers(m: Made): boolean {
  const d = readFileSync(m.dataFile);
  const e = readFileSync(m.expected);
  return !d.subarray(0, Math.min(d.length, e.length)).equals(e.subarray(0, Math.min(d.length, e.length)));
}

function judgeRaw(m: Made): void {
  const info = JSON.parse(qOk(m.dir, 'qemu-img', ['info', '--output=json', m.image])) as { format: string; 'virtual-size': number };
  expect(info.format).toBe('raw');
  expect(info['virtual-size']).toBe(m.vsize);
  expect(statSync(m.image).size).toBe(m.vsize);
  const cmp = q(m.dir, 'qemu-img', ['compare', '-f', 'raw', '-F', 'raw', m.expected, m.image]);
  expect(cmp.out).toContain('Images are identical');
  expect(cmp.status).toBe(0);
  expect(existsSync(m.dataFile), 'the data file no longer exists by its name').toBe(false);
  expect(existsSync(journalPath(m.image))).toBe(false);
}

describe.runIf(haveQemu)('an image whose data lives in another file → raw, by adopting the data file (judged by qemu-img)', () => {
  const cases: { kind: Kind; name: string; stale: boolean; zeroBytes?: number }[] = [
    { kind: 'qcow2-raw', name: 'qcow2 data_file_raw=on (zero clusters: QEMU zeroed the data file itself)', stale: false, zeroBytes: 0 },
    { kind: 'qcow2-stale', name: 'qcow2 data_file without raw, zero clusters over stale bytes (zeroed first)', stale: true, zeroBytes: 192 << 10 },
    { kind: 'qcow2-short', name: 'qcow2 data file shorter than the disk (extended sparse)', stale: true, zeroBytes: 64 << 10 },
    { kind: 'qcow2-long', name: 'qcow2 data file longer than the disk (cut to the virtual size)', stale: true, zeroBytes: 192 << 10 },
    { kind: 'vmdk-flat', name: 'VMDK monolithicFlat (descriptor + flat extent)', stale: false, zeroBytes: 0 },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const m = make(c.kind);
      try {
        expect(dataFileDiffers(m)).toBe(c.stale);
        const dataBefore = statSync(m.dataFile).size;
        if (c.kind === 'qcow2-short') expect(dataBefore).toBeLessThan(m.vsize);
        if (c.kind === 'qcow2-long') expect(dataBefore).toBeGreaterThan(m.vsize);
        const imageBytes = readFileSync(m.image);
        const dataBytes = readFileSync(m.dataFile);
        // plan (and a dry run's plan) writes nothing and says what the conversion will do.
        const plan = await planConversion(m.image, { to: 'raw', drivers: allDrivers });
        expect(readFileSync(m.image).equals(imageBytes)).toBe(true);
        expect(readFileSync(m.dataFile).equals(dataBytes)).toBe(true);
        expect(plan.target.format).toBe('raw');
        expect(plan.dataMoveBytes).toBe(0);
        expect(plan.metadataBytes).toBe(0);
        expect(plan.adoption).toEqual({ dataFile: m.dataFile, zeroBytes: c.zeroBytes, lengthBefore: dataBefore, lengthAfter: m.vsize, renamedTo: m.image });
        const r = await convertInPlace(m.image, { to: 'raw', drivers: allDrivers });
        expect(r.adoption).toEqual(plan.adoption);
        expect(r.written).toEqual({ metadataBytes: 0, dataBytes: 0, compactionBytes: 0 });
        judgeRaw(m);
        // Nothing pending: recover has nothing to do.
        expect((await recover(m.image, { drivers: allDrivers })).action).toBe('none');
      } finally {
        m.cleanup();
      }
    }, 60_000);
  }

  it('the CLI says what happened to the data file; --dry-run writes nothing', () => {
    const m = make('qcow2-stale');
    try {
      const bin = new URL('../../bin/imgconv', import.meta.url).pathname;
      const before = readdirSync(m.dir).sort();
      const dry = spawnSync(bin, ['inplace', '--dry-run', '--to', 'raw', m.image], { encoding: 'utf8' });
      expect(dry.status, dry.stderr).toBe(0);
      expect(dry.stdout).toMatch(/adopts the data file: .*d\.raw \(zeroes 192 KiB \(196608 bytes\)/);
      expect(readdirSync(m.dir).sort()).toEqual(before);
      const run = spawnSync(bin, ['inplace', '--progress', 'none', '--to', 'raw', m.image], { encoding: 'utf8' });
      expect(run.status, run.stderr).toBe(0);
      expect(run.stdout).toContain(`${m.image} is now raw; its data file ${m.dataFile} was adopted and no longer exists by that name`);
      judgeRaw(m);
    } finally {
      m.cleanup();
    }
  }, 60_000);

  const twoStep: { kind: Kind; to: string; options: Record<string, string>; qemuFormat: string }[] = [
    { kind: 'qcow2-stale', to: 'qed', options: {}, qemuFormat: 'qed' },
    { kind: 'qcow2-raw', to: 'vmdk', options: {}, qemuFormat: 'vmdk' },
    { kind: 'qcow2-long', to: 'vhd', options: {}, qemuFormat: 'vpc' },
    { kind: 'vmdk-flat', to: 'vhd', options: { subformat: 'fixed' }, qemuFormat: 'vpc' },
    { kind: 'vmdk-flat', to: 'qcow2', options: {}, qemuFormat: 'qcow2' },
    { kind: 'qcow2-short', to: 'qcow2', options: { data_file_raw: 'on' }, qemuFormat: 'qcow2' },
  ];
  for (const c of twoStep) {
    it(`to another format, in two steps (adoption, then raw → ${c.to}${Object.keys(c.options).length ? ` -o ${Object.entries(c.options).map(([k, v]) => `${k}=${v}`).join(',')}` : ''}): ${c.kind}`, async () => {
      const m = make(c.kind);
      try {
        const imageBytes = readFileSync(m.image);
        const plan = await planConversion(m.image, { to: c.to, options: c.options, drivers: allDrivers });
        expect(readFileSync(m.image).equals(imageBytes)).toBe(true);
        expect(plan.steps?.map((p) => p.target.format)).toEqual(['raw', c.to]);
        expect(plan.adoption?.dataFile).toBe(m.dataFile);
        const r = await convertInPlace(m.image, { to: c.to, options: c.options, drivers: allDrivers });
        expect(r.steps?.map((p) => p.target.format)).toEqual(['raw', c.to]);
        expect(r.adoption).toEqual(plan.adoption);
        // The plan of the second step was made on the data file as the adoption leaves it: exact.
        expect(r.steps![1]!.dataMoveBytes).toBe(plan.steps![1]!.dataMoveBytes);
        expect(r.steps![1]!.metadataBytes).toBe(plan.steps![1]!.metadataBytes);
        expect(existsSync(m.dataFile)).toBe(false);
        expect(existsSync(journalPath(m.image))).toBe(false);
        const judged = r.companion ?? m.image;
        const cmp = q(m.dir, 'qemu-img', ['compare', '-f', 'raw', '-F', c.qemuFormat, m.expected, judged]);
        expect(cmp.out).toContain('Images are identical');
        const info = JSON.parse(qOk(m.dir, 'qemu-img', ['info', '--output=json', '-f', c.qemuFormat, judged])) as { 'virtual-size': number };
        expect(info['virtual-size']).toBe(m.vsize);
        if (c.qemuFormat !== 'vpc') expect(q(m.dir, 'qemu-img', ['check', '-f', c.qemuFormat, judged]).status).toBe(0);
        expect((await probe(await fileStorage.open(judged, { write: false }), allDrivers)).driver.name).toBe(c.to);
      } finally {
        m.cleanup();
      }
    }, 60_000);
  }

  it('refused byte-identical: a backing file; a flat extent not at its guest offset (both with the old advice: qemu-img convert)', async () => {
    const t = withTmpDir('imgconv-adopt-');
    try {
      qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M']);
      qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=c.raw', '-b', 'base.qcow2', '-F', 'qcow2', 'child.qcow2', '4M']);
      io(t.dir, 'qcow2', 'child.qcow2', ['write -P 0x41 0 64k']);
      // A flat extent that starts 1 MiB into its file: guest byte x is file byte x + 1 MiB.
      writeFileSync(t.path('off-flat.vmdk'), Buffer.alloc(5 << 20, 0x5a));
      writeFileSync(
        t.path('off.vmdk'),
        ['# Disk DescriptorFile', 'version=1', 'CID=12345678', 'parentCID=ffffffff', 'createType="monolithicFlat"', '', '# Extent description', 'RW 8192 FLAT "off-flat.vmdk" 2048', '', '# The Disk Data Base', '#DDB', '', 'ddb.virtualHWVersion = "4"', 'ddb.geometry.cylinders = "8"', 'ddb.geometry.heads = "16"', 'ddb.geometry.sectors = "63"', 'ddb.adapterType = "ide"', ''].join('\n'),
      );
      expect(q(t.dir, 'qemu-img', ['info', 'off.vmdk']).status).toBe(0);
      for (const [image, data, why] of [
        ['child.qcow2', 'c.raw', /external data file.*backing file.*qemu-img convert/],
        ['off.vmdk', 'off-flat.vmdk', /external data file.*guest offset.*qemu-img convert/],
      ] as const) {
        const before = [readFileSync(t.path(image)), readFileSync(t.path(data))];
        for (const api of [planConversion, convertInPlace]) {
          const e = await api(t.path(image), { to: 'raw', drivers: allDrivers }).catch((x: unknown) => x);
          expect(e, image).toBeInstanceOf(UnsupportedError);
          expect((e as Error).message).toMatch(why);
        }
        expect(readFileSync(t.path(image)).equals(before[0]!)).toBe(true);
        expect(readFileSync(t.path(data)).equals(before[1]!)).toBe(true);
        expect(existsSync(journalPath(t.path(image)))).toBe(false);
      }
    } finally {
      t.cleanup();
    }
  }, 60_000);

  it('refused byte-identical: the image or its data file named through a symbolic link (the rename would replace the link)', async () => {
    const m = make('qcow2-stale');
    try {
      symlinkSync('disk.qcow2', `${m.dir}/link.qcow2`);
      // A second qcow2 whose data file name is a link to the first one's data file.
      symlinkSync('d.raw', `${m.dir}/dlink.raw`);
      qOk(m.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=dlink.raw', 'other.qcow2', String(m.vsize)]);
      const before = [readFileSync(m.image), readFileSync(m.dataFile), readFileSync(`${m.dir}/other.qcow2`)];
      for (const image of [`${m.dir}/link.qcow2`, `${m.dir}/other.qcow2`]) {
        const e = await convertInPlace(image, { to: 'raw', drivers: allDrivers }).catch((x: unknown) => x);
        expect(e, image).toBeInstanceOf(UnsupportedError);
        expect((e as Error).message).toMatch(/is a symbolic link/);
      }
      expect([readFileSync(m.image), readFileSync(m.dataFile), readFileSync(`${m.dir}/other.qcow2`)].every((b, i) => b.equals(before[i]!))).toBe(true);
      expect(lstatSync(`${m.dir}/link.qcow2`).isSymbolicLink()).toBe(true);
      expect(lstatSync(`${m.dir}/dlink.raw`).isSymbolicLink()).toBe(true);
    } finally {
      m.cleanup();
    }
  }, 60_000);

  it('refused: guest data whose first sector would make the raw file probe as another format', async () => {
    const t = withTmpDir('imgconv-adopt-');
    try {
      qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=d.raw,data_file_raw=on', 'disk.qcow2', '4M']);
      // A QED header at the start of the guest disk.
      qOk(t.dir, 'qemu-img', ['create', '-q', '-f', 'qed', 'inner.qed', '1M']);
      io(t.dir, 'qcow2', 'disk.qcow2', ['write -P 0x61 1M 64k']);
      const head = readFileSync(t.path('inner.qed')).subarray(0, 4096);
      const fd = readFileSync(t.path('d.raw'));
      fd.set(head, 0);
      writeFileSync(t.path('d.raw'), fd);
      const before = readFileSync(t.path('d.raw'));
      const e = await convertInPlace(t.path('disk.qcow2'), { to: 'raw', drivers: allDrivers }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(UnsupportedError);
      expect((e as Error).message).toMatch(/looks like another format.*read as a qed image/);
      expect(readFileSync(t.path('d.raw')).equals(before)).toBe(true);
      expect(existsSync(t.path('disk.qcow2'))).toBe(true);
    } finally {
      t.cleanup();
    }
  }, 60_000);
});

// ---------------------------------------------------------------------------------------------------
// Storage-level tests: a QEMU-made image pair loaded into memory storage.

/** The files of a made image, under /m/ in memory. */
function loadMade(m: Made): { files: Files; image: string; data: string; want: string; format: string } {
  const files: Files = new Map();
  const image = `/m/${m.image.split('/').pop()}`;
  const data = `/m/${m.dataFile.split('/').pop()}`;
  files.set(image, new Uint8Array(readFileSync(m.image)));
  files.set(data, new Uint8Array(readFileSync(m.dataFile)));
  return { files, image, data, want: sha(readFileSync(m.expected)), format: m.qfmt };
}

/** The guest SHA-256 of the file at `path`, opened as whatever it probes as, and that format. */
async function guestOf(storage: MemoryStorage, path: string): Promise<{ format: string; sha: string; subformat?: string }> {
  const chain = await openImage(path, { drivers: allDrivers, opener: (p, o) => storage.open(p, o) });
  try {
    const r = await GuestReader.create(chain);
    const { info } = chain.layers[0]!;
    return { format: chain.layers[0]!.format, sha: sha(await r.read(0, info.virtualSize)), ...(info.subformat !== undefined ? { subformat: info.subformat } : {}) };
  } finally {
    await chain.close();
  }
}

describe.runIf(haveQemu)('adoption: the data file on another file system (storage layer)', () => {
  it('refused before any write with the commands that keep the data file as the raw disk', async () => {
    const m = make('qcow2-stale');
    try {
      const { files, image, data } = loadMade(m);
      const storage = memoryStorageOf(files);
      storage.deviceOf = (p) => (p === data ? 2 : 1);
      const e = await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(UnsupportedError);
      expect((e as Error).message).toMatch(/on another file system.*run in \/m: truncate -s 16777216 d\.raw && qemu-img compare -f qcow2 -F raw disk\.qcow2 d\.raw && sync d\.raw && rm disk\.qcow2$/);
      for (const [p, b] of files) expect(sha(storage.files.get(p)!.snapshot()), p).toBe(sha(b));
      // The same storage with one file system: adopted.
      storage.deviceOf = () => 1;
      await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage });
      expect(await storage.exists(data)).toBe(false);
      expect(await guestOf(storage, image)).toEqual({ format: 'raw', sha: loadMade(m).want });
    } finally {
      m.cleanup();
    }
  }, 60_000);
});

describe.runIf(haveQemu)('adoption: every crash point and every I/O error leaves the source or the raw disk, same guest content', () => {
  for (const kind of ['qcow2-stale', 'qcow2-long', 'qcow2-short', 'vmdk-flat'] as const) {
    it(kind, async () => {
      const m = make(kind);
      try {
        const { files, image, data, want, format } = loadMade(m);
        const rec = new RecordingStorage(files);
        await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: rec });
        const kinds = rec.log.map((o) => o.kind);
        // The rename is the commit point; the data file is flushed before it and the directory synced after.
        const renameAt = kinds.indexOf('rename');
        expect(renameAt).toBeGreaterThan(0);
        expect(kinds.slice(0, renameAt)).toContain('flush');
        expect(kinds.slice(renameAt + 1)).toContain('syncDir');
        expect(rec.log.every((o) => o.path !== image || o.kind === 'rename' || o.kind === 'syncDir'), 'the image file itself is never written').toBe(true);
        const seen = { source: 0, raw: 0 };
        const judge = async (state: MemoryStorage, what: string) => {
          // Nothing to recover, ever: no journal is written.
          expect((await recover(image, { drivers: allDrivers, storage: state })).action, what).toBe('none');
          const g = await guestOf(state, image);
          expect(g.sha, `${what}: guest content of ${g.format}`).toBe(want);
          if (g.format === 'raw') {
            expect(await state.exists(data), what).toBe(false);
            seen.raw++;
          } else {
            expect(g.format, what).toBe(format);
            seen.source++;
          }
        };
        // Process kill after every operation.
        for (let n = 0; n <= rec.log.length; n++) await judge(stateAfter(rec.initial, rec.log, n), `kill after op ${n}`);
        // Power loss before each flush/sync: durable operations plus subsets of the rest.
        const rnd = prng(20261204);
        for (const cut of powerLossCuts(rec.log)) {
          for (const ch of powerLossChoices(rec.log, cut, rnd, 8, 16)) await judge(powerLossState(rec.initial, rec.log, cut, ch.kept), `power loss at ${cut} keeping ${ch.kept.join(',')}`);
        }
        expect(seen.source).toBeGreaterThan(0);
        expect(seen.raw).toBeGreaterThan(0);
        console.log(`${kind} → raw: ${rec.log.length} operations; ${seen.source + seen.raw} kill and power-loss states (${seen.source} source, ${seen.raw} raw)`);

        // An EIO at each faultable operation (once, and from then on): a clear error, the file at the path
        // still the source or the raw disk; after a transient fault, running the conversion again finishes.
        const counter = new FaultyStorage(memoryStorageOf(files), 'EIO', -1, false);
        await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: counter });
        expect(counter.count).toBeGreaterThan(4);
        for (let at = 0; at < counter.count; at++) {
          for (const persistent of [false, true]) {
            const inner = memoryStorageOf(files);
            const faulty = new FaultyStorage(inner, 'EIO', at, persistent);
            const e = await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: faulty }).catch((x: unknown) => x);
            const what = `EIO ${persistent ? 'from' : 'at'} ${at} (${faulty.hit})`;
            if (e !== undefined) expect(e, what).toBeInstanceOf(ImgconvError);
            if (e instanceof ConversionFailedError) expect(['untouched', 'converted'], what).toContain(e.imageState);
            await judge(inner, what);
            if (!persistent && (await inner.exists(data))) {
              await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: inner });
              expect(await guestOf(inner, image), `${what}, then again`).toEqual({ format: 'raw', sha: want });
            }
          }
        }
      } finally {
        m.cleanup();
      }
    }, 120_000);
  }
});

describe.runIf(haveQemu)('adoption then a second step: every crash point and I/O error, then recover, ends in the source or the target', () => {
  for (const [kind, to] of [['qcow2-stale', 'qed'], ['vmdk-flat', 'vmdk']] as const) {
    it(`${kind} → ${to}`, async () => {
      const m = make(kind);
      try {
        const { files, image, data, want, format } = loadMade(m);
        const options = kind === 'vmdk-flat' ? { subformat: 'monolithicSparse' } : {};
        const rec = new RecordingStorage(files);
        await convertInPlace(image, { to, options, drivers: allDrivers, storage: rec });
        const kinds = rec.log.map((o) => o.kind);
        const renameAt = kinds.indexOf('rename');
        // The journal (with the step after the adoption) is durable before the rename.
        const created = rec.log.findIndex((o) => o.kind === 'create' && o.path === journalPath(image));
        expect(created).toBeGreaterThanOrEqual(0);
        expect(created).toBeLessThan(renameAt);
        expect(kinds.slice(created, renameAt)).toEqual(expect.arrayContaining(['write', 'flush', 'syncDir']));
        const seen: Record<string, number> = {};
        const judge = async (state: MemoryStorage, what: string) => {
          await recover(image, { drivers: allDrivers, storage: state });
          expect(await state.exists(journalPath(image)), `${what}: journal left`).toBe(false);
          expect((await recover(image, { drivers: allDrivers, storage: state })).action, `${what}: second recover`).toBe('none');
          const g = await guestOf(state, image);
          expect(g.sha, `${what}: guest content of ${g.format}`).toBe(want);
          // The source while its data file is there; the target once the data file was adopted.
          const end = (await state.exists(data)) ? 'source' : 'target';
          expect(g.format, what).toBe(end === 'source' ? format : to);
          if (kind === 'vmdk-flat') expect(g.subformat, what).toBe(end === 'source' ? 'monolithicFlat' : 'monolithicSparse');
          seen[end] = (seen[end] ?? 0) + 1;
        };
        for (let n = 0; n <= rec.log.length; n++) await judge(stateAfter(rec.initial, rec.log, n), `kill after op ${n}`);
        {
          // Stopped just before the rename, and then the data file deleted by hand: the image is still the
          // source, not raw, so recover must not run raw → target on it: refused, journal and image kept.
          const state = stateAfter(rec.initial, rec.log, renameAt);
          await state.remove(data);
          const before = sha(state.files.get(image)!.snapshot());
          const e = await recover(image, { drivers: allDrivers, storage: state }).catch((x: unknown) => x);
          expect(e).toBeInstanceOf(RecoveryRefusedError);
          expect((e as Error).message).toMatch(/is gone but the image probes as/);
          expect(await state.exists(journalPath(image))).toBe(true);
          expect(sha(state.files.get(image)!.snapshot())).toBe(before);
        }
        {
          // The other way round: stopped before the rename, the data file still there, but the image's
          // name now holds a raw disk (a file made at the old name, or a rename the file system lost):
          // "the data file is there, so nothing happened" must not be believed — refused, nothing removed.
          const state = stateAfter(rec.initial, rec.log, renameAt);
          const rawDisk = state.files.get(data)!.snapshot();
          await state.remove(image);
          const d = await state.create(image);
          await d.write(rawDisk, 0);
          await d.close();
          const e = await recover(image, { drivers: allDrivers, storage: state }).catch((x: unknown) => x);
          expect(e).toBeInstanceOf(RecoveryRefusedError);
          expect((e as Error).message).toMatch(/is still there but the image probes as raw/);
          expect(await state.exists(journalPath(image))).toBe(true);
          expect(await state.exists(data)).toBe(true);
        }
        const rnd = prng(20261204);
        for (const cut of powerLossCuts(rec.log)) {
          for (const ch of powerLossChoices(rec.log, cut, rnd, 6, 8)) await judge(powerLossState(rec.initial, rec.log, cut, ch.kept), `power loss at ${cut} keeping ${ch.kept.join(',')}`);
        }
        expect(seen.source).toBeGreaterThan(0);
        expect(seen.target).toBeGreaterThan(0);
        console.log(`${kind} → ${to}: ${rec.log.length} operations; ${seen.source + seen.target} kill and power-loss states recovered (${seen.source} source, ${seen.target} target)`);
        // An EIO at each faultable operation, from then on (a dead disk): a clear error; then recover.
        const counter = new FaultyStorage(memoryStorageOf(files), 'EIO', -1, false);
        await convertInPlace(image, { to, options, drivers: allDrivers, storage: counter });
        for (let at = 0; at < counter.count; at++) {
          const inner = memoryStorageOf(files);
          const faulty = new FaultyStorage(inner, 'EIO', at, true);
          const e = await convertInPlace(image, { to, options, drivers: allDrivers, storage: faulty }).catch((x: unknown) => x);
          expect(e, `EIO from ${at} (${faulty.hit})`).toBeInstanceOf(ImgconvError);
          await judge(inner, `EIO from ${at} (${faulty.hit})`);
        }
      } finally {
        m.cleanup();
      }
    }, 300_000);
  }
});

describe.runIf(haveQemu)('adoption: every failure says which state the image is in', () => {
  it('an EIO at any storage operation (reads while planning included) is a ConversionFailedError; a failing close after the rename does not hide the conversion', async () => {
    const m = make('qcow2-stale');
    try {
      const { files, image, data, want } = loadMade(m);
      const counter = new FaultyStorage(memoryStorageOf(files), 'EIO', -1, false);
      await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: counter });
      const bare: string[] = [];
      for (let at = 0; at < counter.count; at++) {
        const inner = memoryStorageOf(files);
        const faulty = new FaultyStorage(inner, 'EIO', at, true);
        const e = await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage: faulty }).catch((x: unknown) => x);
        if (!(e instanceof ConversionFailedError)) bare.push(`${faulty.hit}: ${e instanceof Error ? e.constructor.name : String(e)}`);
        else if (e.imageState === 'untouched') expect((await guestOf(inner, image)).format, String(faulty.hit)).toBe('qcow2');
      }
      expect(bare).toEqual([]);

      // close(2) may report an error after the data was synced (NFS): the rename happened, the image is raw.
      const storage = memoryStorageOf(files);
      const open = storage.open.bind(storage);
      storage.open = async (p, o) => {
        const d = await open(p, o);
        if (p !== data || !o.write) return d;
        return Object.assign(Object.create(d) as typeof d, { close: async () => Promise.reject(new Error('EIO on close')) });
      };
      const r = await convertInPlace(image, { to: 'raw', drivers: allDrivers, storage }).catch((x: unknown) => x);
      expect(r instanceof Error ? r.message : 'no error').toBe('no error');
      expect(await guestOf(storage, image)).toEqual({ format: 'raw', sha: want });
    } finally {
      m.cleanup();
    }
  }, 60_000);
});
