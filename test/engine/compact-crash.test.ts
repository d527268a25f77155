/**
 * Crash states of compaction's round B in batches: a QED whose data lies past its end (every other
 * cluster moved there, the old places punched — what a rollback of a relocation leaves) is compacted
 * with a window of two clusters, so round B runs in many batches (copy → flush → repoint → flush →
 * punch the old places). Every kill point (each prefix of the recorded operations) and sampled
 * power-loss states (per flush, subsets of the operations not yet flushed) must leave an image that
 * qemu-img check accepts (leaks allowed) and that reads the original guest content; running reclaim
 * again must finish with a clean check (no leaks) and the same content.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { randomRaw } from '../support/peak-storage.js';
import { batches, compact } from '../../src/engine/compact.js';
import { reclaim } from '../../src/engine/convert.js';
import { openImage } from '../../src/image.js';
import { checkImage } from '../../src/check.js';
import type { MemoryStorage } from '../../src/blockdev/storage.js';
import { qemuAvailable, qemuImg, qemuImgStatus, withTmpDir } from '../support/qemu.js';
import { RecordingStorage, filesOf, storageDigest, memoryStorageOf, powerLossChoices, powerLossCuts, powerLossState, prng, stateAfter, type Files } from '../support/recording.js';

const KiB = 1 << 10;
const MiB = 1 << 20;
const IMAGE = '/img/disk.qed';

describe('batches (round B of compaction)', () => {
  const m = (length: number) => ({ r: { length } });
  test('consecutive runs of at most the window, at least one move each, nothing lost or reordered', () => {
    const moves = [4, 4, 4, 4, 4].map(m);
    expect(batches(moves, 8).map((b) => b.length)).toEqual([2, 2, 1]);
    expect(batches(moves, 3).map((b) => b.length)).toEqual([1, 1, 1, 1, 1]);
    expect(batches(moves, 100).map((b) => b.length)).toEqual([5]);
    expect(batches([], 8)).toEqual([]);
    expect(batches(moves, 8).flat()).toEqual(moves);
  });
});

describe.skipIf(!qemuAvailable())('compaction in batches: every kill point and sampled power losses', () => {
  const tmp = withTmpDir('imgconv-compact-crash-');
  afterAll(() => tmp.cleanup());

  /** Every other data cluster copied past the end and repointed (pointer durable), its old place punched. */
  const scatter = async (files: Files): Promise<{ files: Files; cs: number; moved: number }> => {
    const storage = memoryStorageOf(files);
    const dev = await storage.open(IMAGE, { write: true });
    const chain = await openImage(IMAGE, { drivers: allDrivers, format: 'qed', topDevice: dev, backing: false });
    const img = chain.layers[0]!;
    const cs = img.info.clusterSize!;
    const units = (await img.relocatable!(0, 0)).filter((_, i) => i % 2 === 0);
    let end = await dev.size();
    for (const u of units) {
      const b = new Uint8Array(u.length);
      await dev.read(b, u.host);
      await dev.write(b, end);
      await dev.write(u.pointer.encode(end), u.pointer.offset);
      await dev.punchHole(u.host, u.length);
      end += cs;
    }
    await dev.flush();
    await chain.close();
    await dev.close();
    return { files: filesOf(storage), cs, moved: units.length * cs };
  };

  /** qemu-img's verdict on the image of a state: no corruption or error (leaks as allowed), same guest content. */
  const judge = (state: MemoryStorage, raw: string, name: string, leaksAllowed: boolean): string | undefined => {
    const file = tmp.path(name);
    writeFileSync(file, state.files.get(IMAGE)!.snapshot());
    const chk = qemuImgStatus(['check', '--output=json', '-f', 'qed', file]);
    const j = JSON.parse(chk.stdout || '{}') as { corruptions?: number; leaks?: number; 'check-errors'?: number };
    if (j.corruptions || j['check-errors'] || (!leaksAllowed && j.leaks) || !chk.stdout) return `qemu-img check: ${chk.stdout}${chk.stderr}`;
    const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'qed', raw, file]);
    if (cmp.status !== 0) return `qemu-img compare: ${cmp.stdout}${cmp.stderr}`;
    return undefined;
  };

  /** Reclaim run again on a crash state: it must finish, leave no leak and keep the content. */
  const rerun = async (state: MemoryStorage, raw: string, name: string, window: number): Promise<string | undefined> => {
    const dev = await state.open(IMAGE, { write: true });
    try {
      await reclaim(IMAGE, dev, allDrivers, 'qed', undefined, undefined, true, undefined, false, window);
    } catch (e) {
      return `reclaim again threw ${(e as Error).message}`;
    } finally {
      await dev.close();
    }
    const chain = await openImage(IMAGE, { drivers: allDrivers, format: 'qed', opener: (p, o) => state.open(p, o) });
    try {
      const r = await checkImage(chain.layers[0]!);
      if (r.corruptions + r.leaks + r.checkErrors) return `our check after reclaim: ${r.messages.slice(0, 2).join('; ')}`;
    } finally {
      await chain.close();
    }
    return judge(state, raw, name, false);
  };

  test('QED, 64 KiB clusters, window of two clusters', async () => {
    const raw = tmp.path('src.raw');
    randomRaw(raw, 2 * MiB);
    const qed = tmp.path('src.qed');
    qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, qed]);
    const { files, cs, moved } = await scatter(new Map([[IMAGE, new Uint8Array(readFileSync(qed))]]));
    const window = 2 * cs;
    // The scattered image: valid, same content, leaked where the data left.
    expect(judge(memoryStorageOf(files), raw, 'scattered.qed', true)).toBeUndefined();

    const rec = new RecordingStorage(files);
    const dev = await rec.open(IMAGE, { write: true });
    const result = await compact(IMAGE, dev, allDrivers, 'qed', undefined, window);
    await dev.close();
    // Round B ran in many batches: every moved cluster came back below the end.
    expect(result.dataMovedBytes).toBe(moved);
    expect(result.dataMovedBytes / window).toBeGreaterThanOrEqual(8);
    expect(result.lengthAfter).toBeLessThan(result.lengthBefore);
    // Each batch punches its old places once its pointers are durable (the copies no longer punch their
    // destinations first: random data overwrites whatever stale bytes free space holds).
    const punches = rec.log.filter((o) => o.kind === 'punch').length;
    expect(punches).toBeGreaterThanOrEqual(moved / window);
    expect(judge(stateAfter(rec.initial, rec.log, rec.log.length), raw, 'done.qed', false)).toBeUndefined();

    const failures: string[] = [];
    // States already judged (a flush changes no bytes: the kill points before and after it are one state).
    const seen = new Set<string>();
    const fresh = (state: MemoryStorage) => {
      const d = storageDigest(state);
      if (seen.has(d)) return false;
      seen.add(d);
      return true;
    };
    let kill = 0;
    for (let n = 0; n <= rec.log.length; n++) {
      const state = stateAfter(rec.initial, rec.log, n);
      if (!fresh(state)) continue;
      kill++;
      const why = judge(state, raw, 'kill.qed', true) ?? (await rerun(state, raw, 'kill-again.qed', window));
      if (why) failures.push(`kill after ${n} of ${rec.log.length} operations: ${why}`);
    }
    const rnd = prng(20261204);
    let power = 0;
    for (const cut of powerLossCuts(rec.log)) {
      // A few subsets per flush: the whole harness's exhaustive sets would take minutes of qemu-img here.
      let k = 0;
      for (const c of powerLossChoices(rec.log, cut, rnd, 2, 2)) {
        if (k >= 3) break;
        const state = powerLossState(rec.initial, rec.log, c.cut, c.kept);
        if (!fresh(state)) continue;
        k++;
        const why = judge(state, raw, 'power.qed', true) ?? (await rerun(state, raw, 'power-again.qed', window));
        if (why) failures.push(`power loss before ${c.cut}, kept [${c.kept.join(',')}]${c.reordered ? ' reordered' : ''}: ${why}`);
        power++;
      }
    }
    console.log(`compaction of ${moved / KiB} KiB in batches of ${window / KiB} KiB: ${rec.log.length} operations (${punches} punches), ${kill} distinct kill states, ${power} distinct power-loss states`);
    expect(failures.slice(0, 5)).toEqual([]);
    expect(kill).toBeGreaterThan(4 * (moved / window));
  }, 600_000);
});
