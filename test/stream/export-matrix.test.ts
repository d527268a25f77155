/**
 * Every source of the fixture matrix streamed to every stream format, judged by qemu-img: the
 * stream written to a file through a Node write stream (backpressure path of stdout) must be
 * `qemu-img compare`-identical to the source (its backing chain included), `qemu-img check`-clean
 * where QEMU checks the format, report the source's virtual size, and be exactly as long as
 * `measure` said. In-process, so the whole matrix stays fast; the CLI through real pipes is
 * test/stream/cli.test.ts.
 *
 * Not streamed to raw: the two fixtures of several GiB (qed-sparse-10g, vhd-large), whose raw
 * stream is gigabytes of zeros; they are streamed to the other formats.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createWriteStream, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { measureExport, streamExport } from '../../src/stream/export.js';
import { WritableSink } from '../../src/stream/sink.js';
import { generateMatrix, isProbeTrap, listMatrix } from '../integration/matrix.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';

const TARGETS: { name: string; qemu: string; checks: boolean }[] = [
  { name: 'qcow2', qemu: 'qcow2', checks: true },
  { name: 'vhd', qemu: 'vpc', checks: false },
  { name: 'vmdk', qemu: 'vmdk', checks: true },
  { name: 'raw', qemu: 'raw', checks: false },
];
/** Raw streams above this are not written (gigabytes of zeros); see the file comment. */
const RAW_LIMIT = 256 << 20;

const rows = listMatrix().filter((r) => !isProbeTrap(r));
const haveQemu = qemuAvailable();

async function streamToFile(source: string, to: string, out: string): Promise<number> {
  const ws = createWriteStream(out);
  const sink = new WritableSink(ws, out);
  const r = await streamExport(source, sink, { to, drivers: allDrivers });
  await sink.flush();
  await new Promise<void>((resolve, reject) => ws.end((e?: Error | null) => (e ? reject(e) : resolve())));
  return r.bytes;
}

describe.skipIf(!haveQemu)('stream: the fixture matrix to every stream format', () => {
  let tmp: ReturnType<typeof withTmpDir>;
  let dir = '';

  beforeAll(() => {
    tmp = withTmpDir('imgconv-stream-matrix-');
    dir = join(tmp.dir, 'fixtures');
    generateMatrix(dir);
  }, 120_000);
  afterAll(() => tmp?.cleanup());

  it('covers every format of the matrix as a source', () => {
    expect(new Set(rows.map((r) => r.imgconvFormat))).toEqual(new Set(['raw', 'qcow2', 'qed', 'vmdk', 'vhd']));
    expect(rows.length).toBeGreaterThanOrEqual(40);
  });

  it('target options: qcow2 v2 with 512 B clusters, qcow2 with 2 MiB clusters and 1-bit refcounts, fixed VHD, VMDK for lsilogic', { timeout: 120_000 }, async () => {
    const variants: [string, string, Record<string, string>, (info: Record<string, unknown>) => void][] = [
      ['qcow2', 'qcow2', { compat: '0.10', cluster_size: '512' }, (i) => expect(i['cluster-size']).toBe(512)],
      ['qcow2', 'qcow2', { cluster_size: '2M', refcount_bits: '1' }, (i) => expect(i['cluster-size']).toBe(2 << 20)],
      ['vhd', 'vpc', { subformat: 'fixed' }, () => {}],
      ['vmdk', 'vmdk', { adapter_type: 'lsilogic', hwversion: '21' }, () => {}],
    ];
    const src = join(dir, 'qcow2-child.qcow2');
    for (const [to, qf, options, more] of variants) {
      const out = join(tmp.dir, `options-${to}-${Object.values(options).join('-')}`);
      const ws = createWriteStream(out);
      const sink = new WritableSink(ws, out);
      await streamExport(src, sink, { to, options, drivers: allDrivers });
      await sink.flush();
      await new Promise<void>((resolve) => ws.end(() => resolve()));
      expect((await measureExport(src, { to, options, drivers: allDrivers })).required).toBe(statSync(out).size);
      expect(spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', qf, src, out]).status).toBe(0);
      if (qf !== 'vpc') expect(spawnSync('qemu-img', ['check', '-f', qf, out], { encoding: 'utf8' }).stdout).toContain('No errors were found');
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-f', qf, out], { encoding: 'utf8' })) as Record<string, unknown>;
      expect(info['virtual-size']).toBe(1 << 20);
      more(info);
    }
  });

  for (const row of rows) {
    it(row.name, { timeout: 120_000 }, async () => {
      const file = join(dir, row.path);
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-f', row.qemuFormat, row.path], { cwd: dir, encoding: 'utf8' })) as { 'virtual-size': number };
      const problems: string[] = [];
      for (const t of TARGETS) {
        if (t.name === 'raw' && info['virtual-size'] > RAW_LIMIT) continue;
        const out = join(tmp.dir, `${row.name}.${t.name}`);
        const written = await streamToFile(file, t.name, out);
        const length = statSync(out).size;
        const measured = (await measureExport(file, { to: t.name, drivers: allDrivers })).required;
        if (written !== length || measured !== length) problems.push(`${t.name}: measure ${measured}, reported ${written}, file ${length} bytes`);
        const cmp = spawnSync('qemu-img', ['compare', '-f', row.qemuFormat, '-F', t.qemu, row.path, out], { cwd: dir, encoding: 'utf8' });
        if (cmp.status !== 0) problems.push(`${t.name}: qemu-img compare exit ${cmp.status}: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`);
        if (t.checks) {
          const chk = spawnSync('qemu-img', ['check', '-f', t.qemu, out], { encoding: 'utf8' });
          if (chk.status !== 0 || !chk.stdout.includes('No errors were found')) problems.push(`${t.name}: qemu-img check exit ${chk.status}: ${chk.stdout.trim()}`);
        }
        const outInfo = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-f', t.qemu, out], { encoding: 'utf8' })) as { 'virtual-size': number; format: string };
        if (outInfo['virtual-size'] !== info['virtual-size']) problems.push(`${t.name}: virtual size ${outInfo['virtual-size']}, source ${info['virtual-size']}`);
        if (outInfo.format !== t.qemu) problems.push(`${t.name}: qemu-img info says ${outInfo.format}`);
        // The output stands alone: the chain was collapsed, no backing file is named.
        if ('backing-filename' in outInfo) problems.push(`${t.name}: names a backing file`);
      }
      if (problems.length) expect.fail(`${row.name} (${row.notes}):\n${problems.join('\n')}`);
    });
  }
});
