/**
 * raw as a conversion target (identity placement): the real engine on images qemu-img made, judged by
 * qemu-img (compare against a copy taken before, info: raw of the same virtual size). QED and VMDK
 * sources relocate their data in place; qcow2, VHD dynamic and compressed sources go through an
 * intermediate format in two steps; VHD fixed loses its footer without moving a byte. Refusals leave
 * the file byte-identical. Disk usage is held to the source's (the result is sparse where the guest
 * reads zeros).
 */
import { copyFileSync, existsSync, readFileSync, statSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace, planConversion, type ConversionReport } from '../../src/engine/convert.js';
import { journalPath } from '../../src/engine/journal.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { qemuAvailable, qemuImg, qemuImgStatus, qemuIo, withTmpDir } from '../support/qemu.js';

const haveQemu = qemuAvailable();

/** Allocated bytes of a file (st_blocks). */
function allocated(file: string): number {
  return statSync(file).blocks * 512;
}

async function convertAndJudge(file: string, srcFmt: string, options: Record<string, string> = {}): Promise<ConversionReport> {
  const copy = `${file}.orig`;
  copyFileSync(file, copy);
  const before = JSON.parse(qemuImg(['info', '--output=json', '-f', srcFmt, copy])) as Record<string, unknown>;
  const plan = await planConversion(file, { to: 'raw', drivers: allDrivers, options });
  expect(readFileSync(file).equals(readFileSync(copy)), 'plan must not write').toBe(true);
  const report = await convertInPlace(file, { to: 'raw', drivers: allDrivers, options });
  expect(existsSync(journalPath(file))).toBe(false);
  // Plan and conversion agree (a two-step plan's second step is planned on a view of the first's
  // result, so it too must match what was done).
  expect(report.dataMoveBytes).toBe(plan.dataMoveBytes);
  expect(report.written.dataBytes).toBe(plan.dataMoveBytes);
  expect(report.metadataBytes).toBe(plan.metadataBytes);
  expect(report.steps?.length ?? 1).toBe(plan.steps?.length ?? 1);
  expect(report.finalLength).toBe(plan.finalLength);
  const cmp = qemuImgStatus(['compare', '-f', srcFmt, '-F', 'raw', copy, file]);
  expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  expect(cmp.status).toBe(0);
  const info = JSON.parse(qemuImg(['info', '--output=json', file])) as Record<string, unknown>;
  expect(info.format).toBe('raw');
  expect(info['virtual-size']).toBe(before['virtual-size']);
  expect(statSync(file).size).toBe(before['virtual-size']);
  // Sparse where the guest reads zeros: no more allocated than the source held, or than its data
  // decompressed (+ one cluster of slack for a partly written first cluster).
  const map = JSON.parse(qemuImg(['map', '--output=json', '-f', srcFmt, copy])) as { length: number; data: boolean }[];
  const guestData = map.filter((m) => m.data).reduce((s, m) => s + m.length, 0);
  expect(allocated(file)).toBeLessThanOrEqual(Math.max(allocated(copy), guestData) + 65536);
  return report;
}

const writes = ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -z 5M 64k', 'write -P 0x33 40M 64k', 'write -P 0x44 63M 1M'];
const qemuMade = (format: string, opts: string[] = [], size = '64M', cmds = writes) => (p: string) => {
  qemuImg(['create', '-q', '-f', format, ...(opts.length ? ['-o', opts.join(',')] : []), p, size]);
  qemuIo(p, format, cmds);
};

interface Source {
  name: string;
  format: string;
  create: (path: string) => void;
  /** Steps expected (1: relocated in place; 2: through an intermediate format). */
  steps: number;
  check?: (r: ConversionReport) => void;
}

const sources: Source[] = [
  { name: 'QED 64k (data in the header cluster carried by the commit)', format: 'qed', create: qemuMade('qed'), steps: 1 },
  {
    name: 'QED 4k, one long run shifted behind the tables (a chain)',
    format: 'qed',
    create: qemuMade('qed', ['cluster_size=4k'], '32M', ['write -P 0x5a 0 24M', 'write -P 0x5b 30M 64k']),
    steps: 1,
    check: (r) => {
      expect(r.relocation!.rounds).toBeGreaterThan(1);
      // Each byte moves at most twice (once to scratch, once home).
      expect(r.dataMoveBytes).toBeLessThanOrEqual(2 * (24 << 20) + 2 * 65536);
    },
  },
  { name: 'QED odd size', format: 'qed', create: qemuMade('qed', [], '33555456', ['write -P 0x61 0 64k', 'write -P 0x62 33554944 512']), steps: 1 },
  { name: 'VMDK monolithicSparse (redundant grain tables repointed too)', format: 'vmdk', create: qemuMade('vmdk'), steps: 1 },
  { name: 'qcow2 64k (through an intermediate format)', format: 'qcow2', create: qemuMade('qcow2'), steps: 2 },
  {
    name: 'qcow2 compressed',
    format: 'qcow2',
    create: (p) => {
      qemuImg(['create', '-q', '-f', 'raw', `${p}.raw`, '16M']);
      qemuIo(`${p}.raw`, 'raw', ['write -P 0x77 0 2M', 'write -P 0x78 9M 1M']);
      qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', `${p}.raw`, p]);
    },
    steps: 2,
  },
  { name: 'VHD dynamic', format: 'vpc', create: qemuMade('vpc'), steps: 2 },
  {
    name: 'VMDK streamOptimized',
    format: 'vmdk',
    create: (p) => {
      qemuImg(['create', '-q', '-f', 'raw', `${p}.raw`, '16M']);
      qemuIo(`${p}.raw`, 'raw', ['write -P 0x79 0 1M', 'write -P 0x7a 15M 1M']);
      qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', `${p}.raw`, p]);
    },
    steps: 2,
  },
  {
    name: 'VHD fixed (the footer goes, nothing moves)',
    format: 'vpc',
    create: qemuMade('vpc', ['subformat=fixed']),
    steps: 1,
    check: (r) => expect(r.dataMoveBytes).toBe(0),
  },
];

describe.runIf(haveQemu)('raw target: conversions judged by qemu-img', () => {
  for (const src of sources) {
    it(src.name, async () => {
      const t = withTmpDir();
      try {
        const file = t.path('disk.img');
        src.create(file);
        const r = await convertAndJudge(file, src.format);
        expect(r.steps?.length ?? 1).toBe(src.steps);
        src.check?.(r);
      } finally {
        t.cleanup();
      }
    }, 60_000);
  }
});

describe.runIf(haveQemu)('raw target: refusals before any write', () => {
  const refuses = async (file: string, expectErr: (e: unknown) => void, options: Record<string, string> = {}) => {
    const before = readFileSync(file);
    const err = await convertInPlace(file, { to: 'raw', drivers: allDrivers, options }).catch((e: unknown) => e);
    expectErr(err);
    expect(readFileSync(file).equals(before), 'the refused image is byte-identical').toBe(true);
    expect(existsSync(journalPath(file))).toBe(false);
  };

  it('an image with a backing file (raw has none), naming the way out', async () => {
    const t = withTmpDir();
    try {
      qemuImg(['create', '-q', '-f', 'raw', t.path('base.raw'), '8M']);
      qemuImg(['create', '-q', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', t.path('child.qed'), '8M']);
      qemuIo(t.path('child.qed'), 'qed', ['write -P 0x21 1M 64k']);
      await refuses(t.path('child.qed'), (e) => {
        expect(e).toBeInstanceOf(UnsupportedError);
        expect((e as Error).message).toMatch(/backing file.*rebase/);
      });
    } finally {
      t.cleanup();
    }
  });

  it('options (raw has none) and raw → raw', async () => {
    const t = withTmpDir();
    try {
      qemuMade('qed')(t.path('a.qed'));
      await refuses(t.path('a.qed'), (e) => expect(e).toBeInstanceOf(UsageError), { cluster_size: '65536' });
      qemuImg(['create', '-q', '-f', 'raw', t.path('b.raw'), '1M']);
      await refuses(t.path('b.raw'), (e) => expect((e as Error).message).toMatch(/already raw/));
    } finally {
      t.cleanup();
    }
  });
});

describe.runIf(haveQemu)('raw target: cancellation', () => {
  it('an abort during relocation leaves a valid source that reads the same (and no journal)', async () => {
    const t = withTmpDir();
    try {
      const file = t.path('c.qed');
      qemuMade('qed', ['cluster_size=4k'], '32M', ['write -P 0x5c 0 20M'])(file);
      copyFileSync(file, `${file}.orig`);
      const ac = new AbortController();
      let moved = 0;
      const err = await convertInPlace(file, {
        to: 'raw',
        drivers: allDrivers,
        signal: ac.signal,
        onProgress: (e) => {
          if (e.phase === 'move' && e.bytesDone > 0 && ++moved === 2) ac.abort();
        },
      }).catch((e: unknown) => e);
      expect((err as Error).message).toMatch(/cancelled before the commit point/);
      expect(existsSync(journalPath(file))).toBe(false);
      const cmp = qemuImgStatus(['compare', '-f', 'qed', '-F', 'qed', `${file}.orig`, file]);
      expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
      const chk = qemuImgStatus(['check', '-f', 'qed', file]);
      expect(chk.stdout + chk.stderr).not.toMatch(/corrupt|ERROR/i);
    } finally {
      t.cleanup();
    }
  }, 60_000);
});
