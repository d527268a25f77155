/**
 * Recovery keeps the relocation window of the conversion it finishes or undoes: a user short of space
 * ran `inplace --move-window 1M`, the process died (kill -9) mid-conversion, and `imgconv recover` must
 * not then need the 64 MiB default's room — on a nearly full disk that is ENOSPC during recovery where
 * the conversion itself fitted. The PREPARE record carries the window (plan.relocationWindow); recover
 * passes it to reclaim / compaction / rollback and to a second step it runs; `recover --move-window`
 * overrides it. Disk space during recovery is measured with PeakStorage.
 *
 * The kill: from a chosen progress event on, every mutating operation of the conversion throws (its own
 * clean-up too), so the files stay as a killed process leaves them (with the OS keeping every write).
 */
import { describe, expect, test } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { PeakStorage, randomRawSuite } from '../support/peak-storage.js';
import { PassThroughStorage, passThroughDevice } from '../support/pass-through.js';
import { fileStorage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';
import { convertInPlace, planConversion, type ConvertOptions, type ProgressEvent } from '../../src/engine/convert.js';
import { recover } from '../../src/engine/recover.js';
import { journalPath } from '../../src/engine/journal.js';
import { readJournal } from '../../src/engine/recover.js';
import { qemuAvailable, qemuImg, qemuImgStatus } from '../support/qemu.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const WINDOW = 1 * MiB;

/** After `kill()`, every mutation through it fails, as if the process were gone; open devices are kept to close. */
class KillStorage extends PassThroughStorage {
  dead = false;
  readonly opened: BlockDevice[] = [];
  /** Dies just before a write this says yes to (as well as when `dead` is set from outside). */
  killBeforeWrite: (path: string) => boolean = () => false;
  constructor() {
    super(fileStorage);
  }
  private guard<A extends unknown[], R>(op: (...a: A) => Promise<R>): (...a: A) => Promise<R> {
    return async (...a: A) => {
      if (this.dead) throw new Error('killed');
      return op(...a);
    };
  }
  protected override wrap(d: BlockDevice, path: string, _opts: OpenOptions): BlockDevice {
    this.opened.push(d);
    return passThroughDevice(d, {
      write: async (b, o) => {
        if (!this.dead && this.killBeforeWrite(path)) this.dead = true;
        return this.guard((b: Uint8Array, o: number) => d.write(b, o))(b, o);
      },
      flush: this.guard(() => d.flush()),
      truncate: this.guard((n) => d.truncate(n)),
      punchHole: this.guard((o, n) => d.punchHole(o, n)),
    });
  }
  override async create(path: string): Promise<BlockDevice> {
    if (this.dead) throw new Error('killed');
    return super.create(path);
  }
  override async remove(path: string): Promise<void> {
    if (this.dead) throw new Error('killed');
    return super.remove(path);
  }
  override async rename(from: string, to: string): Promise<void> {
    if (this.dead) throw new Error('killed');
    return super.rename(from, to);
  }
  override async syncDir(path: string): Promise<void> {
    if (this.dead) throw new Error('killed');
    return super.syncDir(path);
  }
  /** The dead process's file descriptors go (and with them its lock on the image). */
  async reap(): Promise<void> {
    for (const d of this.opened) await d.close().catch(() => {});
  }
}

/** Runs the conversion until `killAt` says so, then kills it; the journal must be left behind. */
async function convertKilled(img: string, opts: ConvertOptions, killAt: (e: ProgressEvent) => boolean, killBeforeWrite?: (path: string) => boolean): Promise<void> {
  const storage = new KillStorage();
  if (killBeforeWrite) storage.killBeforeWrite = killBeforeWrite;
  let err: unknown;
  try {
    await convertInPlace(img, { ...opts, storage, onProgress: (e) => {
      if (!storage.dead && killAt(e)) storage.dead = true;
    } });
  } catch (e) {
    err = e;
  }
  await storage.reap();
  expect(storage.dead, 'the kill point was reached').toBe(true);
  expect(err).toBeDefined();
  expect(await fileStorage.exists(journalPath(img))).toBe(true);
}

/** recover under PeakStorage: the most space recovery held over what the image held at the kill. */
async function recoverMeasured(img: string, relocationWindow?: number) {
  const storage = new PeakStorage();
  await storage.start([img]);
  const report = await recover(img, { drivers: allDrivers, storage, ...(relocationWindow !== undefined ? { relocationWindow } : {}) });
  return { report, peak: storage.peakAlloc };
}

describe.skipIf(!qemuAvailable())('recover keeps the conversion\'s relocation window', () => {
  const { tmp, raw } = randomRawSuite('imgconv-recwin-', SIZE);

  test('QED → VHD killed mid-relocation, 1 MiB window: the rollback\'s compaction holds about one window; --move-window 64M overrides', async () => {
    const opts = { to: 'vhd', drivers: allDrivers, relocationWindow: WINDOW };
    const killMidMove = (e: ProgressEvent) => e.phase === 'move' && e.bytesDone >= e.bytesTotal / 2 && e.bytesTotal > 0;
    const make = async (name: string) => {
      const img = tmp.path(name);
      qemuImg(['convert', '-f', 'raw', '-O', 'qed', raw, img]);
      const plan = await planConversion(img, opts);
      expect(plan.steps).toBeUndefined();
      expect(plan.relocation?.rounds).toBeGreaterThan(8);
      await convertKilled(img, opts, killMidMove);
      const st = await readJournal(fileStorage, journalPath(img));
      expect(st.state).toBe('prepared');
      if (st.state !== 'none') expect(st.prepare.plan.relocationWindow).toBe(WINDOW);
      return img;
    };
    const a = await make('a.qed');
    const b = await make('b.qed');
    const kept = await recoverMeasured(a);
    const wide = await recoverMeasured(b, 64 * MiB);
    console.log(`QED → VHD killed mid-relocation (${SIZE / MiB} MiB random, ${WINDOW / MiB} MiB window): recovery peak with the journal's window ${(kept.peak / MiB).toFixed(2)} MiB, with --move-window 64M ${(wide.peak / MiB).toFixed(2)} MiB`);
    for (const [img, r] of [[a, kept], [b, wide]] as const) {
      expect(r.report.action).toBe('rolled-back');
      expect(r.report.format).toBe('qed');
      const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'qed', raw, img]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      const chk = qemuImgStatus(['check', '-f', 'qed', img]);
      expect(chk.status, chk.stdout + chk.stderr).toBe(0);
      expect(await fileStorage.exists(journalPath(img))).toBe(false);
    }
    // A compaction batch of the window, its old places punched before the next (plus a table cluster).
    expect(kept.peak).toBeLessThanOrEqual(2 * WINDOW);
    // The override is taken: the 64 MiB default moves what the relocation left past the end at once.
    expect(wide.peak).toBeGreaterThan(4 * WINDOW);
  }, 300_000);

  // Step 1 (qcow2 → QED) ends with its reclaim; step 2 (QED → raw, relocation in rounds of the window)
  // follows in the same journal.
  for (const c of [
    { when: 'after step 1 (at step 2\'s PREPARE)', state: 'done', step: 1 },
    { when: 'mid step 2\'s relocation', state: 'prepared', step: 2 },
  ] as const) {
    test(`qcow2 → raw (two steps through QED) killed ${c.when}: recover runs step 2 in rounds of the journal's window`, async () => {
      const img = tmp.path(`c-${c.step}.qcow2`);
      qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
      const opts = { to: 'raw', drivers: allDrivers, relocationWindow: WINDOW };
      const plan = await planConversion(img, opts);
      expect(plan.steps?.map((s) => s.target.format)).toEqual(['qed', 'raw']);
      let step1Done = false;
      const onEvent = (e: ProgressEvent) => {
        if (e.phase === 'reclaim' && e.bytesDone === 1 && e.bytesTotal === 1) step1Done = true;
        return c.step === 2 && step1Done && e.phase === 'move' && e.bytesTotal > 0 && e.bytesDone >= e.bytesTotal / 2;
      };
      const jpath = journalPath(img);
      await convertKilled(img, opts, onEvent, (path) => c.step === 1 && step1Done && path === jpath);
      expect(qemuImg(['info', '--output=json', img])).toContain('"format": "qed"');
      const st = await readJournal(fileStorage, jpath);
      expect(st.state).toBe(c.state);
      if (st.state !== 'none') {
        expect(st.step).toBe(c.step);
        expect(st.first.plan.relocationWindow).toBe(WINDOW);
      }
      const r = await recoverMeasured(img);
      console.log(`qcow2 → raw killed ${c.when} (${SIZE / MiB} MiB random, ${WINDOW / MiB} MiB window): recovery peak ${(r.peak / MiB).toFixed(2)} MiB; ${r.report.detail}`);
      expect(r.report.action).toBe('rolled-forward');
      expect(r.report.format).toBe('raw');
      const cmp = qemuImgStatus(['compare', '-f', 'raw', '-F', 'raw', raw, img]);
      expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      expect(await fileStorage.exists(jpath)).toBe(false);
      // QED → raw in rounds of 1 MiB: a round (or the scratch) plus the commit's bytes; with the default
      // window the step takes about the whole disk (identity-window.test.ts: 31.4 MiB planned at 32 MiB).
      expect(r.peak).toBeLessThanOrEqual(4 * WINDOW);
    }, 300_000);
  }
});
