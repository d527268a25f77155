/**
 * `imgconv recover`: finishes or undoes an interrupted conversion from its journal, whatever the point
 * of interruption. Every step is an idempotent rewrite from the journal, so a crash during recovery is
 * recovered by running it again.
 */
import type { BlockDevice } from '../blockdev/types.js';
import { fileStorage, type Storage } from '../blockdev/storage.js';
import { OverlayDevice } from '../blockdev/overlay.js';
import type { FormatDriver } from '../driver.js';
import { ImgconvError } from '../errors.js';
import { openImage, probe } from '../image.js';
import { applyRedo, continueStages, writeCompanion, finishCommitted, overlayMoves, reclaim, reclaimAfterRollback, rollBack, type DataMove, type JournalHandle, type ProgressEvent } from './convert.js';
import { holesAsData, scanHoles } from './holes.js';
import { decodeJournal, journalPath, journalState, requireUnderstood, undoOf, type JournalState, type Region } from './journal.js';
import { identityMapping } from './identity.js';

export interface RecoverOptions {
  drivers: readonly FormatDriver[];
  storage?: Storage;
  onProgress?: (e: ProgressEvent) => void;
  /**
   * The relocation window for reclaim, compaction and a second step (`imgconv recover --move-window`).
   * When not given: the window the interrupted conversion ran with, as its PREPARE records it, else
   * the default.
   */
  relocationWindow?: number;
}

/**
 * The window a conversion recorded in its PREPARE (journal.ts `plan.relocationWindow`). A value that is
 * not a positive whole number of bytes is ignored (the default then): it only bounds extra space.
 */
export function journalWindow(plan: { relocationWindow?: unknown }): number | undefined {
  const w = plan.relocationWindow;
  return typeof w === 'number' && Number.isSafeInteger(w) && w > 0 ? w : undefined;
}

export interface RecoverReport {
  image: string;
  /** none: no interrupted conversion; rolled-back: the source format is back; rolled-forward: converted. */
  action: 'none' | 'rolled-back' | 'rolled-forward';
  format: string | null;
  detail: string;
}

export async function readJournal(storage: Storage, jpath: string): Promise<JournalState & { validLength?: number }> {
  if (!(await storage.exists(jpath))) return { state: 'none' };
  const dev = await storage.open(jpath, { write: false });
  try {
    const size = await dev.size();
    const bytes = new Uint8Array(size);
    let done = 0;
    while (done < size) {
      const n = await dev.read(bytes.subarray(done), done);
      if (n === 0) break;
      done += n;
    }
    const decoded = decodeJournal(bytes.subarray(0, done));
    // Before anything acts on it (even removing a journal with no PREPARE it can read): a newer build's
    // journal is refused whole, image and journal untouched.
    requireUnderstood(decoded, jpath);
    return { ...journalState(decoded), validLength: decoded.validLength };
  } finally {
    await dev.close();
  }
}

export class RecoveryRefusedError extends ImgconvError {}

/**
 * The fixed regions must hold, sector by sector, either the old or the new bytes (a torn in-place
 * write mixes them). Anything else means the image changed since the journal was written: refuse
 * rather than overwrite it.
 */
async function requireJournalMatches(dev: BlockDevice, undo: Region[], redo: Region[], path: string): Promise<void> {
  for (let i = 0; i < undo.length; i++) {
    const u = undo[i]!;
    const r = redo[i];
    const cur = new Uint8Array(u.bytes.length);
    let got = 0;
    while (got < cur.length) {
      const n = await dev.read(cur.subarray(got), u.offset + got);
      if (n === 0) break;
      got += n;
    }
    for (let s = 0; s < cur.length; s += 512) {
      const a = cur.subarray(s, s + 512);
      const same = (b: Uint8Array | undefined) => b !== undefined && Buffer.from(a).equals(Buffer.from(b.subarray(s, s + 512)));
      if (!same(u.bytes) && !same(r?.bytes)) {
        throw new RecoveryRefusedError(
          `${path}: bytes at ${u.offset + s} match neither the state before nor after the interrupted conversion; the image was changed since (refusing to touch it; the journal ${journalPath(path)} is kept)`,
        );
      }
    }
  }
}

export async function recover(path: string, opts: RecoverOptions): Promise<RecoverReport> {
  const storage = opts.storage ?? fileStorage;
  const jpath = journalPath(path);
  const st = await readJournal(storage, jpath);
  if (st.state === 'none') {
    if (await storage.exists(jpath)) {
      // A journal whose prepare record never became durable: the image was never written.
      await storage.remove(jpath);
      await storage.syncDir(jpath);
      return { image: path, action: 'none', format: null, detail: 'removed an incomplete journal; the image was not modified' };
    }
    return { image: path, action: 'none', format: null, detail: 'no interrupted conversion' };
  }
  const { prepare } = st;
  // Recovery keeps the bound on extra space the user chose for the conversion: the last step's window,
  // the first step's when the last step is the adoption's rename (which records one only before a step).
  const window = opts.relocationWindow ?? journalWindow(prepare.plan) ?? journalWindow(st.first.plan);
  opts = { ...opts, ...(window !== undefined ? { relocationWindow: window } : {}) };
  const dev = await storage.open(path, { write: true, lock: true });
  try {
    const report = await recoverStep(path, dev, storage, st, opts);
    // A two-step conversion: after its first step is finished, or when its second step was rolled back
    // before its commit point, the second step runs (again) from the intermediate image, in the same journal.
    const then = st.first.then;
    const next =
      report.action === 'rolled-forward' && prepare.then
        ? prepare.then
        : st.step >= 2 && (st.state === 'prepared' || st.state === 'aborted') && then
          ? then
          : undefined;
    if (!next) return report;
    // Appended records must follow the last valid one, not a torn tail — as the journal is *now*: the
    // step just recovered may have appended (DONE), and cutting that off would send the next recovery
    // back to a state whose source reclaim has already destroyed.
    const now = await readJournal(storage, jpath);
    const journal = await storage.open(jpath, { write: true });
    const validEnd = now.validLength ?? (await journal.size());
    await journal.truncate(validEnd);
    const handle: JournalHandle = { dev: journal, end: validEnd };
    const via = report.action === 'rolled-forward' ? prepare.targetFormat : prepare.sourceFormat;
    const done = await continueStages(
      path,
      dev,
      storage,
      { to: next.to, options: next.options, drivers: opts.drivers, storage, onProgress: opts.onProgress, ...(window !== undefined ? { relocationWindow: window } : {}) },
      handle,
      undefined,
      via,
    );
    return { image: path, action: 'rolled-forward', format: done.target.format, detail: `${report.detail}; then converted ${via} → ${done.target.format}, the second of two steps` };
  } finally {
    await dev.close();
  }
}

async function recoverStep(path: string, dev: BlockDevice, storage: Storage, st: Exclude<JournalState, { state: 'none' }> & { validLength?: number }, opts: RecoverOptions): Promise<RecoverReport> {
  const jpath = journalPath(path);
  const { prepare } = st;
  const window = opts.relocationWindow;
  // Kept when a step follows: the first step's continuation once it rolled forward, or the second step
  // run again after it was rolled back before its commit point.
  // (A second step that failed verification was rolled back to the intermediate image: it runs again too.)
  const keepJournal = prepare.then !== undefined || (st.step >= 2 && (st.state === 'prepared' || st.state === 'aborted'));
  {
    // A journal that a second step will continue is kept (the step appends to it and removes it).
    const removeJournal = async (final = false) => {
      if (keepJournal && !final) return;
      await storage.remove(jpath);
      await storage.syncDir(jpath);
    };
    const identity = prepare.plan.identity === true;
    const adopted = prepare.plan.adoption as { dataFile?: string } | undefined;
    if (st.state === 'prepared' && typeof adopted?.dataFile === 'string') {
      // An adoption with a step after it (src/engine/adopt.ts): its commit point is renaming the data
      // file to the image. The data file still there: the rename did not happen, the image is the source.
      if (await storage.exists(adopted.dataFile)) {
        // …provided the image still reads as the source (a file made at the old name later, or a rename
        // a file system did not keep across the crash, must not be taken for "nothing happened").
        const before = await probe(dev, opts.drivers);
        if (before.driver.name !== prepare.sourceFormat) {
          throw new RecoveryRefusedError(`${path}: the data file ${adopted.dataFile} is still there but the image probes as ${before.driver.name}, not the ${prepare.sourceFormat} source; refusing to touch either (the journal ${jpath} is kept)`);
        }
        await removeJournal(true);
        return { image: path, action: 'rolled-back', format: prepare.sourceFormat, detail: `the conversion stopped before its commit point (renaming the data file ${adopted.dataFile} to the image); the ${prepare.sourceFormat} image is unchanged` };
      }
      const probed = await probe(dev, opts.drivers);
      if (probed.driver.name !== 'raw') {
        throw new RecoveryRefusedError(`${path}: the data file ${adopted.dataFile} is gone but the image probes as ${probed.driver.name}, not the adopted raw disk; refusing to touch it (the journal ${jpath} is kept)`);
      }
      return { image: path, action: 'rolled-forward', format: 'raw', detail: `the data file ${adopted.dataFile} was adopted: ${path} is raw` };
    }
    if (st.state === 'prepared' && prepare.relocating) {
      // Relocation keeps a valid source at every step and nothing in place was overwritten yet: the
      // source stays as the last durable pointers say; reclaim tidies what the moves left behind.
      await reclaim(path, dev, opts.drivers, prepare.sourceFormat, undefined, undefined, true, undefined, false, window);
      await removeJournal(st.step < 2);
      return { image: path, action: 'rolled-back', format: prepare.sourceFormat, detail: `the conversion stopped before its commit point, while relocating data; the ${prepare.sourceFormat} image is valid where its data now lies` };
    }
    if (st.state === 'prepared' || st.state === 'aborted') {
      const { undo, length } = undoOf(prepare, st.state === 'aborted' ? st.commit : undefined);
      await requireJournalMatches(dev, undo, st.state === 'aborted' ? st.redo : [], path);
      await rollBack(dev, undo, length);
      const companion = st.state === 'aborted' ? st.commit?.companion?.path : undefined;
      if (companion !== undefined && (await storage.exists(companion))) {
        await storage.remove(companion);
        await storage.syncDir(companion);
      }
      // A relocating conversion that failed verification: as finishCommitted does after its rollback.
      if (st.state === 'aborted' && prepare.relocating && st.step < 2) await reclaimAfterRollback(storage, path, dev, opts.drivers, prepare.sourceFormat, window);
      await removeJournal(st.step < 2);
      return {
        image: path,
        action: 'rolled-back',
        format: prepare.sourceFormat,
        detail: st.state === 'aborted' ? `the conversion failed verification (${st.reason}); the ${prepare.sourceFormat} image was restored` : `the conversion stopped before its commit point; the ${prepare.sourceFormat} image was restored`,
      };
    }
    if (st.state === 'done') {
      // Verified already; only reclaim may be unfinished. The fixed regions were written and flushed
      // before DONE, and compaction may since have changed them (a moved table's pointer in the
      // header): they must not be rewritten from the journal now.
      await reclaim(path, dev, opts.drivers, prepare.targetFormat, undefined, identity ? st.commit.finalLength : undefined, !prepare.then, identity ? st.commit.redo : undefined, st.commit.companion !== undefined, window);
      await removeJournal();
      return { image: path, action: 'rolled-forward', format: prepare.targetFormat, detail: `the conversion to ${prepare.targetFormat} was complete; finished reclaiming space` };
    }
    // Committed, not yet verified: rewrite the fixed regions, then verify against the source as the
    // journal's undo bytes let us rebuild it, exactly as the conversion itself would have.
    const { undo, length } = undoOf(prepare, st.commit);
    await requireJournalMatches(dev, undo, st.commit.redo, path);
    await applyRedo(dev, st.commit.redo, st.commit.finalLength);
    const companion = st.commit.companion;
    if (companion) await writeCompanion(storage, companion.path, Uint8Array.from(Buffer.from(companion.data, 'base64')));
    const sourceMap = await sourceMappingFromUndo(path, dev, opts.drivers, prepare.sourceFormat, undo, length, journalMoves(prepare.plan.moves), prepare.plan.holesAsData !== false && !identity);
    const expected = identity ? identityMapping(sourceMap) : sourceMap;
    const journal = await storage.open(jpath, { write: true });
    let end = st.validLength ?? (await journal.size());
    await journal.truncate(end);
    const append = async (rec: Uint8Array) => {
      await journal.write(rec, end);
      end += rec.length;
      await journal.flush();
    };
    try {
      await finishCommitted({
        path,
        dev,
        storage,
        drivers: opts.drivers,
        to: prepare.targetFormat,
        expected,
        virtualSize: prepare.plan.virtualSize as number,
        backing: (prepare.plan.backing as string | null) ?? undefined,
        append,
        undo,
        originalLength: length,
        finalLength: st.commit.finalLength,
        identity,
        intermediate: prepare.then !== undefined,
        redo: st.commit.redo,
        ...(companion ? { companion: companion.path } : {}),
        ...(prepare.relocating && st.step < 2 ? { reclaimSourceAs: prepare.sourceFormat } : {}),
        ...(st.step >= 2 ? { secondStepFrom: prepare.sourceFormat } : {}),
        ...(window !== undefined ? { window } : {}),
        onProgress: opts.onProgress,
      });
    } catch (e) {
      await journal.close();
      if ((e as { imageState?: string }).imageState === 'rolled-back') {
        await removeJournal(true);
        return { image: path, action: 'rolled-back', format: prepare.sourceFormat, detail: (e as Error).message };
      }
      throw e;
    }
    await journal.close();
    await removeJournal();
    return { image: path, action: 'rolled-forward', format: prepare.targetFormat, detail: `the conversion to ${prepare.targetFormat} was completed from the journal` };
  }
}

/** The moves as the journal stores them: [guest, length, to] (older journals: objects). */
function journalMoves(raw: unknown): DataMove[] {
  if (!Array.isArray(raw)) return [];
  return raw.map((m) => (Array.isArray(m) ? { guest: m[0] as number, length: m[1] as number, to: m[2] as number, reason: '' } : (m as DataMove)));
}

/** The source's mapping as it was: the source format opened on the image with the undo bytes laid over it. */
async function sourceMappingFromUndo(
  path: string,
  dev: BlockDevice,
  drivers: readonly FormatDriver[],
  format: string,
  undo: Region[],
  originalLength: number,
  moves: DataMove[],
  holesToData: boolean,
) {
  const view = new OverlayDevice(dev, undo, originalLength);
  const chain = await openImage(path, { drivers, format, topDevice: view, backing: false });
  try {
    const own = await chain.layers[0]!.mapping();
    return overlayMoves(holesToData ? holesAsData(own, await scanHoles(dev)) : own, moves);
  } finally {
    await chain.close();
  }
}
