/**
 * Opening chains: backing files resolve relative to the image, loops and absurd depths are refused with
 * a clear error instead of hanging (qemu-img itself hangs on a self-referencing backing file).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { allDrivers } from '../../drivers/index.js';
import { openImage, MAX_CHAIN_DEPTH } from '../../src/image.js';
import { FormatError, UsageError } from '../../src/errors.js';
import { qemuAvailable, qemuImg, withTmpDir } from '../support/qemu.js';

const tmp = withTmpDir('imgconv-chain-');
afterAll(() => tmp.cleanup());
const bin = join(import.meta.dirname, '..', '..', 'bin', 'imgconv');

describe.runIf(qemuAvailable())('backing chains', () => {
  it('refuses an image that is its own backing file', async () => {
    const a = tmp.path('self.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    qemuImg(['rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', a]);
    const err = await openImage(a, { drivers: allDrivers }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FormatError);
    expect((err as Error).message).toMatch(/loops back/);
    // and the CLI answers promptly with the same message
    const r = spawnSync(process.execPath, [bin, 'info', a], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/loops back/);
  });

  it('refuses a loop through two images', async () => {
    const a = tmp.path('a.qcow2');
    const b = tmp.path('b.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b]);
    qemuImg(['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a]);
    await expect(openImage(b, { drivers: allDrivers })).rejects.toThrow(/loops back/);
  });

  it(`refuses chains deeper than ${MAX_CHAIN_DEPTH}`, async () => {
    let prev = 'd0.qcow2';
    qemuImg(['create', '-q', '-f', 'qcow2', tmp.path(prev), '1M']);
    for (let i = 1; i <= MAX_CHAIN_DEPTH; i++) {
      const name = `d${i}.qcow2`;
      qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', prev, '-F', 'qcow2', tmp.path(name), '1M']);
      prev = name;
    }
    const err = await openImage(tmp.path(prev), { drivers: allDrivers }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UsageError);
    expect((err as Error).message).toMatch(/longer than 64/);
    // one layer less opens
    const ok = await openImage(tmp.path(`d${MAX_CHAIN_DEPTH - 1}.qcow2`), { drivers: allDrivers });
    expect(ok.layers).toHaveLength(MAX_CHAIN_DEPTH);
    await ok.close();
  }, 60_000);

  it('resolves a relative backing name against the image directory, not the working directory', async () => {
    const base = tmp.path('rel-base.qcow2');
    const top = tmp.path('rel-top.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'rel-base.qcow2', '-F', 'qcow2', top]);
    const chain = await openImage(top, { drivers: allDrivers });
    try {
      expect(chain.paths).toEqual([top, base]);
      expect(chain.layers[1]!.format).toBe('qcow2');
    } finally {
      await chain.close();
    }
  });
});
