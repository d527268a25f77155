/**
 * qcow2 with a raw external data file as a target (`-o data_file_raw=on`): the image stays (or, relocated,
 * becomes) the raw guest disk and a qcow2 metadata file mapping it 1:1 is created beside it at the commit
 * point. Judged by qemu-img (run from the images' directory: QEMU 7.2 resolves a relative data file name
 * against its working directory); every kill point of a recorded conversion, and every injected I/O error
 * followed by `recover`, ends in the source or in the qcow2 + data file pair with the same guest content.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { COMFORTABLE_METADATA, dataFileMetadataName, MAX_METADATA } from '../../drivers/qcow2/datafile.js';
import { decodeHeader } from '../../drivers/qcow2/header.js';
import { fileStorage, MemoryStorage } from '../../src/blockdev/storage.js';
import { ConversionFailedError, convertInPlace, planConversion } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { recover } from '../../src/engine/recover.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { GuestReader } from '../../src/guest.js';
import { openImage } from '../../src/image.js';
import { FaultyStorage, RecordingStorage, stateAfter } from '../support/recording.js';
import { makeIdentitySource, type IdentitySourceKind } from './identity-support.js';
import { qemuAvailable, qemuImg, qemuIo, withTmpDir } from '../support/qemu.js';

const DF = { data_file_raw: 'on' };
const haveQemu = qemuAvailable();

/** qemu-img in the images' directory, so that the relative data file name resolves beside them. */
function qemuIn(dir: string, args: string[]): { status: number; out: string } {
  const r = spawnSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  return { status: r.status ?? -1, out: r.stdout + r.stderr };
}

function sha(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

describe('metadata file names', () => {
  it('stem + .qcow2, or stem-metadata.qcow2 when that is the image', () => {
    expect(dataFileMetadataName('/d/disk.raw')).toBe('disk.qcow2');
    expect(dataFileMetadataName('/d/disk.img')).toBe('disk.qcow2');
    expect(dataFileMetadataName('/d/disk')).toBe('disk.qcow2');
    expect(dataFileMetadataName('/d/disk.qcow2')).toBe('disk-metadata.qcow2');
  });
});

describe.runIf(haveQemu)('qcow2 with a raw data file as target, judged by qemu-img', () => {
  const cases: { name: string; format: IdentitySourceKind; steps: number; moved?: number; options?: Record<string, string>; meta?: string; cs?: number }[] = [
    { name: 'raw (zero copy: not a byte of the image changes)', format: 'raw', steps: 1, moved: 0 },
    { name: 'raw with data_file naming the image, metadata_file and cluster_size', format: 'raw', steps: 1, moved: 0, options: { data_file: 'disk.img', metadata_file: 'vm.qcow2', cluster_size: '2M' }, meta: 'vm.qcow2', cs: 2 << 20 },
    { name: 'VHD fixed (the footer is cut off)', format: 'vpc-fixed', steps: 1, moved: 0 },
    { name: 'QED (relocated in place)', format: 'qed', steps: 1 },
    { name: 'qcow2 (two steps; disk.qcow2 is taken, so the metadata file is disk-metadata.qcow2)', format: 'qcow2', steps: 2, meta: 'disk-metadata.qcow2' },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const t = withTmpDir();
      try {
        const { qfmt, file, vsize } = makeIdentitySource(t, c.format);
        const before = readFileSync(file);
        const options = { ...DF, ...(c.options ?? {}) };
        const metaName = c.meta ?? 'disk.qcow2';
        const meta = t.path(metaName);
        const dataName = file.slice(t.dir.length + 1);

        const plan = await planConversion(file, { to: 'qcow2', options, drivers: allDrivers });
        expect(plan.companion).toBe(meta);
        if (c.moved !== undefined) expect(plan.dataMoveBytes).toBe(c.moved);
        const r = await convertInPlace(file, { to: 'qcow2', options, drivers: allDrivers });
        expect(r.steps?.length ?? 1).toBe(c.steps);
        expect(r.dataMoveBytes).toBe(plan.dataMoveBytes);
        if (c.moved !== undefined) expect(r.dataMoveBytes).toBe(c.moved);
        expect(existsSync(journalPath(file))).toBe(false);

        const info = JSON.parse(qemuIn(t.dir, ['info', '--output=json', metaName]).out) as {
          format: string;
          'virtual-size': number;
          'cluster-size': number;
          'format-specific': { data: Record<string, unknown> };
        };
        expect(info.format).toBe('qcow2');
        expect(info['virtual-size']).toBe(vsize);
        expect(info['cluster-size']).toBe(c.cs ?? 65536);
        expect(info['format-specific'].data['data-file']).toBe(dataName);
        expect(info['format-specific'].data['data-file-raw']).toBe(true);
        if (c.steps === 1) expect(statSync(meta).size).toBe(plan.metadataBytes);
        // The data file is the raw disk: exactly the virtual size, and for raw/VHD fixed the same bytes.
        expect(statSync(file).size).toBe(vsize);
        if (c.moved === 0) expect(sha(readFileSync(file))).toBe(sha(before.subarray(0, vsize)));
        const check = qemuIn(t.dir, ['check', metaName]);
        expect(check.status, check.out).toBe(0);
        expect(check.out).toContain('No errors were found');
        const cmp = qemuIn(t.dir, ['compare', '-f', qfmt, '-F', 'qcow2', 'orig', metaName]);
        expect(cmp.out).toContain('Images are identical');
        // The data file alone reads as the disk too.
        expect(qemuIn(t.dir, ['compare', '-f', qfmt, '-F', 'raw', 'orig', dataName]).status).toBe(0);
        // QEMU writes through the metadata file into the data file, at the guest offset.
        execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 30M 64k', metaName], { cwd: t.dir, stdio: ['ignore', 'ignore', 'pipe'] });
        expect(readFileSync(file).subarray(30 << 20, (30 << 20) + 65536).every((b) => b === 0x44)).toBe(true);
        expect(qemuIn(t.dir, ['check', metaName]).status).toBe(0);
      } finally {
        t.cleanup();
      }
    }, 60_000);
  }

  it('the metadata file has the layout qemu-img gives data_file_raw=on,preallocation=metadata (same size, header fields, tables)', async () => {
    const t = withTmpDir();
    try {
      const file = t.path('disk.raw');
      writeFileSync(file, Buffer.alloc(0));
      execFileSync('truncate', ['-s', '200M', file]);
      await convertInPlace(file, { to: 'qcow2', options: DF, drivers: allDrivers });
      qemuIn(t.dir, ['create', '-q', '-f', 'qcow2', '-o', 'data_file=q.raw,data_file_raw=on,preallocation=metadata', 'q.qcow2', '200M']);
      const ours = readFileSync(t.path('disk.qcow2'));
      const theirs = readFileSync(t.path('q.qcow2'));
      expect(ours.length).toBe(theirs.length);
      const a = decodeHeader(ours);
      const b = decodeHeader(theirs);
      for (const k of ['version', 'clusterBits', 'size', 'l1Size', 'incompatibleFeatures', 'autoclearFeatures', 'refcountOrder', 'refcountTableClusters'] as const) expect(a[k], k).toEqual(b[k]);
      expect(a.incompatibleFeatures).toBe(4n);
      expect(a.autoclearFeatures).toBe(2n);
      // Each L2 entry: COPIED | guest offset, as QEMU's.
      const l2 = (buf: Buffer, h: typeof a) => buf.subarray(Number(buf.readBigUInt64BE(h.l1TableOffset) & 0x00fffffffffffe00n)).subarray(0, 65536);
      expect(a.l1Size).toBe(1);
      expect(l2(ours, a).equals(l2(theirs, b))).toBe(true);
      expect(l2(ours, a).readBigUInt64BE(8)).toBe((1n << 63n) | 65536n);
    } finally {
      t.cleanup();
    }
  });

  it('refuses before any write, naming the option: another data_file, data_file_raw missing or off, compat=0.10, a bad metadata_file, an existing metadata file, a backing file', async () => {
    const t = withTmpDir();
    try {
      const file = t.path('disk.img');
      qemuImg(['create', '-q', '-f', 'raw', file, '8M']);
      qemuIo(file, 'raw', ['write -P 0x51 0 1M']);
      const before = readFileSync(file);
      const refusals: [Record<string, string>, RegExp][] = [
        [{ data_file: 'other.raw', data_file_raw: 'on' }, /-o data_file=other\.raw: .*the image itself \(disk\.img\)/],
        [{ data_file: '../disk.img', data_file_raw: 'on' }, /-o data_file=\.\.\/disk\.img/],
        [{ data_file: 'disk.img' }, /data_file=disk\.img: .*add -o data_file_raw=on/],
        [{ data_file_raw: 'off' }, /-o data_file_raw=off/],
        [{ data_file_raw: 'on', compat: '0.10' }, /-o compat=0\.10: .*compat=1\.1/],
        [{ data_file_raw: 'on', metadata_file: 'sub/x.qcow2' }, /-o metadata_file=sub\/x\.qcow2/],
        [{ data_file_raw: 'on', metadata_file: 'disk.img' }, /-o metadata_file=disk\.img: names the image/],
      ];
      for (const [options, message] of refusals) {
        const e = await convertInPlace(file, { to: 'qcow2', options, drivers: allDrivers }).catch((x: unknown) => x);
        expect(e, JSON.stringify(options)).toBeInstanceOf(UsageError);
        expect((e as Error).message).toMatch(message);
      }
      writeFileSync(t.path('disk.qcow2'), 'not mine');
      const e = await convertInPlace(file, { to: 'qcow2', options: DF, drivers: allDrivers }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(UsageError);
      expect((e as Error).message).toMatch(/disk\.qcow2 exists.*-o metadata_file=NAME/);
      expect(readFileSync(t.path('disk.qcow2'), 'utf8')).toBe('not mine');
      expect(readFileSync(file).equals(before)).toBe(true);
      expect(existsSync(journalPath(file))).toBe(false);

      qemuImg(['create', '-q', '-f', 'qed', '-b', 'disk.img', '-F', 'raw', t.path('child.qed'), '8M']);
      const childBefore = readFileSync(t.path('child.qed'));
      const e3 = await convertInPlace(t.path('child.qed'), { to: 'qcow2', options: DF, drivers: allDrivers }).catch((x: unknown) => x);
      expect(e3).toBeInstanceOf(UnsupportedError);
      expect((e3 as Error).message).toMatch(/backing file.*rebase/);
      expect(readFileSync(t.path('child.qed')).equals(childBefore)).toBe(true);
      expect(existsSync(t.path('child.qcow2'))).toBe(false);
      expect(existsSync(journalPath(t.path('child.qed')))).toBe(false);
    } finally {
      t.cleanup();
    }
  });
});

// ---------------------------------------------------------------------------------------------------
// The cluster size the metadata's journal budget asks for (sparse raw disks in memory).

async function planSparse(size: number, options: Record<string, string>) {
  const storage = new MemoryStorage();
  const d = await storage.create('/m/disk.raw');
  await d.truncate(size);
  return planConversion('/m/disk.raw', { to: 'qcow2', options, format: 'raw', drivers: allDrivers, storage });
}

describe('qcow2 data file target: the metadata fits the COMMIT record', () => {
  it('64 KiB clusters while the metadata stays within 16 MiB, then the smallest larger size that does', async () => {
    const GiB = 1 << 30;
    const at = async (size: number) => {
      const p = await planSparse(size, DF);
      return { cs: p.target.parameters.cluster_size, meta: p.metadataBytes };
    };
    const small = await at(100 * GiB);
    expect(small.cs).toBe(65536);
    expect(small.meta).toBeLessThanOrEqual(COMFORTABLE_METADATA);
    // 200 GiB at 64 KiB would need 25 MiB of L2 tables.
    const mid = await at(200 * GiB);
    expect(mid.cs).toBe(131072);
    expect(mid.meta).toBeLessThanOrEqual(COMFORTABLE_METADATA);
    // 8 TiB: even 2 MiB clusters need 32 MiB, beyond comfortable but within what the record carries.
    const big = await at(8192 * GiB);
    expect(big.cs).toBe(2 << 20);
    expect(big.meta).toBeGreaterThan(COMFORTABLE_METADATA);
    expect(big.meta).toBeLessThanOrEqual(MAX_METADATA);
  });

  it('refuses before any write when no size (or the chosen one) fits the journal', async () => {
    const TiB = 2 ** 40;
    const e1 = await planSparse(16 * TiB, DF).catch((x: unknown) => x);
    expect(e1).toBeInstanceOf(UnsupportedError);
    expect((e1 as Error).message).toMatch(/journal/);
    const e2 = await planSparse(TiB, { ...DF, cluster_size: '64k' }).catch((x: unknown) => x);
    expect(e2).toBeInstanceOf(UsageError);
    expect((e2 as Error).message).toMatch(/^-o cluster_size=64k: .*commit journal record/);
  });
});

// ---------------------------------------------------------------------------------------------------
// Crash safety: the engine's companion mechanism (created at the commit point from the COMMIT record).

async function guestSha(storage: MemoryStorage, path: string, format: string): Promise<string> {
  const chain = await openImage(path, { drivers: allDrivers, format, opener: (p, o) => storage.open(p, o) });
  try {
    const r = await GuestReader.create(chain);
    return sha(await r.read(0, chain.layers[0]!.info.virtualSize));
  } finally {
    await chain.close();
  }
}

function pattern(size: number): Uint8Array {
  const raw = new Uint8Array(size);
  for (let i = 0; i < 96 << 10; i++) raw[i] = (i * 7) & 0xff;
  for (let i = 0; i < 128 << 10; i++) raw[(2 << 20) + i] = (i * 13) & 0xff;
  return raw;
}

describe('qcow2 data file target: every kill point recovers', () => {
  const cases = [
    { name: 'raw → qcow2 + data file (nothing moves; the metadata file at the commit point)', source: 'raw' },
    { name: 'QED → qcow2 + data file (relocation first)', source: 'qed' },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const raw = pattern(4 << 20);
      const want = sha(raw);
      let image = raw;
      if (c.source === 'qed') {
        const seed = new RecordingStorage(new Map([['/m/disk.img', raw]]));
        await convertInPlace('/m/disk.img', { to: 'qed', options: { cluster_size: '4096' }, format: 'raw', drivers: allDrivers, storage: seed.live });
        image = new Uint8Array(await seed.live.files.get('/m/disk.img')!.size());
        await seed.live.files.get('/m/disk.img')!.read(image, 0);
      }
      const rec = new RecordingStorage(new Map([['/m/disk.img', image]]));
      await convertInPlace('/m/disk.img', { to: 'qcow2', options: DF, format: c.source, drivers: allDrivers, storage: rec });
      const outcomes = { source: 0, converted: 0 };
      for (let n = 0; n <= rec.log.length; n++) {
        const state = stateAfter(rec.initial, rec.log, n);
        await recover('/m/disk.img', { drivers: allDrivers, storage: state });
        expect(await state.exists(journalPath('/m/disk.img')), `kill after op ${n}: journal left`).toBe(false);
        if (await state.exists('/m/disk.qcow2')) {
          expect(await guestSha(state, '/m/disk.qcow2', 'qcow2'), `kill after op ${n}: qcow2 content`).toBe(want);
          // The data file alone is the raw disk.
          expect(await guestSha(state, '/m/disk.img', 'raw'), `kill after op ${n}: data file content`).toBe(want);
          outcomes.converted++;
        } else {
          expect(await guestSha(state, '/m/disk.img', c.source), `kill after op ${n}: ${c.source} content`).toBe(want);
          outcomes.source++;
        }
      }
      expect(outcomes.source).toBeGreaterThan(0);
      expect(outcomes.converted).toBeGreaterThan(0);
    });
  }
});

describe.runIf(haveQemu)('qcow2 data file target: recover after an I/O error at each operation, judged by qemu-img', () => {
  it('raw: a persistent EIO from each operation on; recover ends in the raw disk unchanged or in a clean qcow2 + data file pair', async () => {
    const t = withTmpDir();
    try {
      const file = t.path('disk.img');
      qemuImg(['create', '-q', '-f', 'raw', file, '8M']);
      qemuIo(file, 'raw', ['write -P 0x61 0 1M', 'write -P 0x62 5M 64k']);
      const original = readFileSync(file);
      copyFileSync(file, t.path('orig'));
      const probe = new FaultyStorage(fileStorage, 'EIO', -1, false);
      await convertInPlace(file, { to: 'qcow2', options: DF, drivers: allDrivers, storage: probe });
      const total = probe.count;
      expect(total).toBeGreaterThan(5);
      const outcomes = { raw: 0, rolledForward: 0 };
      const actions = { none: 0, 'rolled-back': 0, 'rolled-forward': 0 };
      for (let at = 0; at < total; at++) {
        writeFileSync(file, original);
        for (const f of ['disk.qcow2', 'disk.img.imgconv-journal']) if (existsSync(t.path(f))) execFileSync('rm', [t.path(f)]);
        const faulty = new FaultyStorage(fileStorage, 'EIO', at, true);
        const e = await convertInPlace(file, { to: 'qcow2', options: DF, drivers: allDrivers, storage: faulty }).catch((x: unknown) => x);
        expect(e, `fault at ${at} (${faulty.hit})`).toBeInstanceOf(ConversionFailedError);
        const r = await recover(file, { drivers: allDrivers });
        actions[r.action]++;
        expect(existsSync(journalPath(file)), `fault at ${at}: journal left`).toBe(false);
        expect(readFileSync(file).equals(original), `fault at ${at} (${faulty.hit}): the data file changed`).toBe(true);
        if (existsSync(t.path('disk.qcow2'))) {
          const check = qemuIn(t.dir, ['check', 'disk.qcow2']);
          expect(check.status, `fault at ${at}: ${check.out}`).toBe(0);
          expect(qemuIn(t.dir, ['compare', '-f', 'raw', '-F', 'qcow2', 'orig', 'disk.qcow2']).out).toContain('Images are identical');
          outcomes.rolledForward++;
        } else {
          outcomes.raw++;
        }
      }
      expect(outcomes.raw).toBeGreaterThan(0);
      expect(outcomes.rolledForward).toBeGreaterThan(0);
      // Faults before the COMMIT record roll back; faults after it leave a journal that recover finishes.
      expect(actions['rolled-back'] + actions.none).toBeGreaterThan(0);
      expect(actions['rolled-forward']).toBeGreaterThan(0);
    } finally {
      t.cleanup();
    }
  }, 120_000);
});

// ---------------------------------------------------------------------------------------------------
// The reverse, qcow2 with a data file → raw: the data file is adopted (src/engine/adopt.ts; more cases in
// test/engine/adopt.test.ts) — zeroed where the image reads zeros, given the virtual size, renamed to the
// image's name — and judged. Other targets: two steps, the adoption and then raw → the target.

describe.runIf(haveQemu)('qcow2 with a data file → raw: the data file is adopted', () => {
  it('round trip raw → qcow2 + data file → raw: byte-identical, the data file now named disk.qcow2', async () => {
    const t = withTmpDir();
    try {
      const file = t.path('disk.img');
      qemuImg(['create', '-q', '-f', 'raw', file, '16M']);
      qemuIo(file, 'raw', ['write -P 0x71 0 1M', 'write -P 0x72 9M 64k']);
      const original = readFileSync(file);
      await convertInPlace(file, { to: 'qcow2', options: DF, drivers: allDrivers });
      // A write through QEMU, so the qcow2 is not only what imgconv made.
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x73 12M 4k', 'disk.qcow2'], { cwd: t.dir, stdio: ['ignore', 'ignore', 'pipe'] });
      const want = Buffer.from(original);
      want.fill(0x73, 12 << 20, (12 << 20) + 4096);
      const r = await convertInPlace(t.path('disk.qcow2'), { to: 'raw', drivers: allDrivers });
      expect(r.adoption).toEqual({ dataFile: file, zeroBytes: 0, lengthBefore: 16 << 20, lengthAfter: 16 << 20, renamedTo: t.path('disk.qcow2') });
      expect(existsSync(file)).toBe(false);
      expect(existsSync(journalPath(t.path('disk.qcow2')))).toBe(false);
      expect(readFileSync(t.path('disk.qcow2')).equals(want)).toBe(true);
      expect(qemuIn(t.dir, ['info', 'disk.qcow2']).out).toMatch(/file format: raw/);
      // Another target from a data-file qcow2: two steps, the adoption and raw → QED.
      copyFileSync(t.path('disk.qcow2'), file);
      await convertInPlace(file, { to: 'qcow2', options: { ...DF, metadata_file: 'again.qcow2' }, drivers: allDrivers });
      const r2 = await convertInPlace(t.path('again.qcow2'), { to: 'qed', options: { cluster_size: '64k' }, drivers: allDrivers });
      expect(r2.steps?.map((s) => s.target.format)).toEqual(['raw', 'qed']);
      expect(existsSync(file)).toBe(false);
      expect(qemuIn(t.dir, ['compare', '-f', 'raw', '-F', 'qed', 'disk.qcow2', 'again.qcow2']).out).toContain('Images are identical');
      expect(qemuIn(t.dir, ['check', '-f', 'qed', 'again.qcow2']).status).toBe(0);
    } finally {
      t.cleanup();
    }
  }, 60_000);

  it('data_file_raw=off with zeros marked over stale bytes: the stale bytes are zeroed, then the data file adopted', async () => {
    const t = withTmpDir();
    try {
      qemuIn(t.dir, ['create', '-q', '-f', 'qcow2', '-o', 'data_file=d.raw', 'd.qcow2', '8M']);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x81 0 128k', '-c', 'write -z 64k 64k', 'd.qcow2'], { cwd: t.dir, stdio: ['ignore', 'ignore', 'pipe'] });
      expect(qemuIn(t.dir, ['convert', '-O', 'raw', 'd.qcow2', 'want.raw']).status).toBe(0);
      // The data file holds 0x81 where the image reads zeros: as it is, it is not the disk.
      expect(qemuIn(t.dir, ['compare', '-f', 'qcow2', '-F', 'raw', 'd.qcow2', 'd.raw']).out).toMatch(/Content mismatch/);
      const r = await convertInPlace(t.path('d.qcow2'), { to: 'raw', drivers: allDrivers });
      expect(r.adoption?.zeroBytes).toBe(64 << 10);
      expect(existsSync(t.path('d.raw'))).toBe(false);
      expect(qemuIn(t.dir, ['compare', '-f', 'raw', '-F', 'raw', 'want.raw', 'd.qcow2']).out).toContain('Images are identical');
      expect(statSync(t.path('d.qcow2')).size).toBe(8 << 20);
    } finally {
      t.cleanup();
    }
  });
});
