/**
 * Many images in one run (`imgconv inplace IMAGE...`): the batch runner as a library function. Each
 * image goes through the same steps as a single conversion (convertInPlace and recover), so the
 * commit protocol and its guarantees are per image; the batch adds scheduling, isolation (one
 * image failing or being refused never affects another), an optional crash-safe manifest that lets
 * a re-run resume, and one stream of events tagged by image.
 */
import { resolve } from 'node:path';
import { fileStorage, type Storage } from '../blockdev/storage.js';
import { ConversionFailedError, convertInPlace, InterruptedConversionError, type ConversionReport, type ConvertOptions, type ProgressEvent } from '../engine/convert.js';
import { journalPath } from '../engine/journal.js';
import { recover, type RecoverReport } from '../engine/recover.js';
import { ImgconvError, UsageError } from '../errors.js';
import { findDriver, probe } from '../image.js';
import { nodeBatchFileSystem, type BatchFileSystem } from './files.js';
import { resolveImages, type BatchImage } from './images.js';
import { Manifest, MANIFEST_VERSION, readManifest, type ManifestIo, type ManifestRecord, type ManifestState } from './manifest.js';
import { runScheduled, scheduleLimits, type ScheduleLimits } from './schedule.js';

export type { BatchImage } from './images.js';

/** How an image of the batch ended. */
export type ImageOutcome = 'converted' | 'skipped' | 'refused' | 'failed' | 'needs-recover' | 'pending';
export const IMAGE_OUTCOMES: readonly ImageOutcome[] = ['converted', 'skipped', 'refused', 'failed', 'needs-recover', 'pending'];

/** In which state a failure left the image (ConversionFailedError's states; unknown after an internal error). */
export type ImageStateAfter = ConversionFailedError['imageState'] | 'unknown';

export interface ImageResult {
  index: number;
  /** The name the user gave. */
  image: string;
  /** The real path converted. */
  path: string;
  aliases: string[];
  outcome: ImageOutcome;
  /** The image's format before this run touched it, once known. */
  from?: string;
  to: string;
  /** Time spent on this image in this run (0 when it was not started). */
  elapsedMs: number;
  /** The conversion's report (outcome converted, unless recovery finished it). */
  report?: ConversionReport;
  /** An interrupted conversion found on the image and recovered before anything else. */
  recovered?: RecoverReport;
  /** Why the image was refused, failed, needs recovery or is still pending. */
  reason?: string;
  /** What happened beyond the outcome (skipped: why nothing had to be done). */
  note?: string;
  /** For refused, failed, needs-recover and pending: the state the image is in. */
  imageState?: ImageStateAfter;
  /** The command that makes the image valid again (outcome needs-recover). */
  recoverCommand?: string;
}

export interface BatchReport {
  to: string;
  results: ImageResult[];
  counts: Record<ImageOutcome, number>;
  /** Every image is converted or was already in the target format. */
  ok: boolean;
  /** The signal stopped the run before every image was tried. */
  interrupted: boolean;
  manifest?: string;
  elapsedMs: number;
}

export type BatchEvent =
  /** Before anything runs: every image of the batch, and the scheduling limits. */
  | { type: 'start'; to: string; images: BatchImage[]; limits: ScheduleLimits; filesystems: number; manifest?: string }
  /** An image's turn begins (recovery, checks, conversion). */
  | { type: 'image-start'; image: BatchImage }
  /** An interrupted conversion was found on the image; recovery begins. */
  | { type: 'image-recover'; image: BatchImage }
  | { type: 'image-recovered'; image: BatchImage; report: RecoverReport }
  /** The conversion itself begins (the image is `from`, not yet the target). */
  | { type: 'image-convert'; image: BatchImage; from: string }
  | { type: 'image-progress'; image: BatchImage; event: ProgressEvent }
  /** Exactly one per image. */
  | { type: 'image-end'; image: BatchImage; result: ImageResult }
  | { type: 'end'; report: BatchReport };

export interface ConvertManyOptions extends Omit<ConvertOptions, 'onProgress' | 'signal'> {
  /**
   * How many images convert at once. Unset: one at a time per filesystem, filesystems in parallel
   * (conversions are disk-bound). N: N at a time whatever the filesystem.
   */
  jobs?: number;
  /** JSON-lines manifest path: written as the run goes; a re-run with the same path resumes. */
  manifest?: string;
  manifestIo?: ManifestIo;
  files?: BatchFileSystem;
  /** Stops the batch: no new image starts; running conversions stop at their next safe point. */
  signal?: AbortSignal;
  onEvent?: (e: BatchEvent) => void;
  /** Clock for elapsed times (tests). */
  now?: () => number;
}

/** An image with no outcome yet, and what the manifest said of it. */
interface Item {
  image: BatchImage;
  previous?: ManifestRecord;
  /** Said in the image's result (a done record that no longer holds). */
  note?: string;
}

function emptyCounts(): Record<ImageOutcome, number> {
  return { converted: 0, skipped: 0, refused: 0, failed: 0, 'needs-recover': 0, pending: 0 };
}

const OUTCOME_STATE: Record<ImageOutcome, ManifestState> = {
  converted: 'done',
  skipped: 'done',
  refused: 'refused',
  failed: 'failed',
  'needs-recover': 'needs-recover',
  pending: 'pending',
};

export function errorText(e: unknown): string {
  return e instanceof ImgconvError ? e.message : `internal error: ${e instanceof Error ? e.message : String(e)}`;
}

function isAbortCause(e: ConversionFailedError): boolean {
  const c = e.causeError;
  return c instanceof Error && (c.name === 'AbortError' || (c as { code?: string }).code === 'ABORT_ERR');
}

/**
 * How a failure is reported. A refusal (anything imgconv throws on purpose before writing) leaves
 * the file byte-identical; a ConversionFailedError says the state itself; a journal left beside
 * the image always means it needs `imgconv recover`, whatever the error said.
 */
async function classify(e: unknown, path: string, storage: Storage, signal: AbortSignal | undefined): Promise<Pick<ImageResult, 'outcome' | 'reason' | 'imageState' | 'recoverCommand'>> {
  const journal = await storage.exists(journalPath(path)).catch(() => false);
  const reason = errorText(e);
  if (journal || (e instanceof ConversionFailedError && e.imageState === 'needs-recover') || e instanceof InterruptedConversionError) {
    return { outcome: 'needs-recover', reason, imageState: 'needs-recover', recoverCommand: `imgconv recover ${shellWord(path)}` };
  }
  if (e instanceof ConversionFailedError) {
    if (signal?.aborted && isAbortCause(e) && (e.imageState === 'untouched' || e.imageState === 'rolled-back')) {
      return { outcome: 'pending', reason: `stopped before its commit point; ${e.imageState === 'untouched' ? 'unchanged' : 'rolled back'}`, imageState: e.imageState };
    }
    return { outcome: 'failed', reason, imageState: e.imageState };
  }
  if (e instanceof ImgconvError) return { outcome: 'refused', reason, imageState: 'untouched' };
  return { outcome: 'failed', reason, imageState: 'unknown' };
}

function shellWord(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The image's format as a conversion would take it: -f when given, else probed. */
async function currentFormat(path: string, opts: Pick<ConvertOptions, 'format' | 'drivers'>, storage: Storage): Promise<string> {
  if (opts.format) return findDriver(opts.drivers, opts.format).name;
  const dev = await storage.open(path, { write: false });
  try {
    return (await probe(dev, opts.drivers)).driver.name;
  } finally {
    await dev.close();
  }
}

/**
 * Names the images of a run: those given, then those the manifest knows that were not given (a
 * re-run without names continues the manifest's batch). A manifest image is named as it was given
 * when that name still leads to it from here, else by its real path.
 */
function batchNames(names: readonly string[], previous: Map<string, ManifestRecord>, files: BatchFileSystem): string[] {
  const out = names.slice();
  const given = new Set(names.map((n) => files.absolute(n)));
  for (const r of previous.values()) {
    if (given.has(r.image)) continue;
    out.push(files.absolute(r.given) === r.image ? r.given : r.image);
    given.add(r.image);
  }
  return out;
}

export async function convertMany(names: readonly string[], opts: ConvertManyOptions): Promise<BatchReport> {
  const storage = opts.storage ?? fileStorage;
  const files = opts.files ?? nodeBatchFileSystem;
  const now = opts.now ?? (() => performance.now());
  const t0 = now();
  const to = findDriver(opts.drivers, opts.to).name;
  const limits = scheduleLimits(opts.jobs);
  const emit = (e: BatchEvent) => {
    try {
      opts.onEvent?.(e);
    } catch {
      // A listener's bug must not take an image's conversion down with it.
    }
  };
  if (names.length === 0 && (opts.manifest === undefined || (await readManifest(opts.manifest, opts.manifestIo)).length === 0)) {
    // Checked before the manifest is created: a mistyped manifest name must not leave an empty file behind.
    throw new UsageError(opts.manifest === undefined ? 'no images to convert' : `no images to convert: none named, and the manifest ${opts.manifest} records none`);
  }
  const manifest = opts.manifest !== undefined ? await Manifest.open(opts.manifest, opts.manifestIo) : undefined;
  try {
    const previous = manifest?.latest() ?? new Map<string, ManifestRecord>();
    const { images, unresolved } = await resolveImages(batchNames(names, previous, files), files);
    const at = () => new Date().toISOString();
    const record = (image: { path: string; name: string }, state: ManifestState, extra: Partial<ManifestRecord> = {}): ManifestRecord => ({
      v: MANIFEST_VERSION,
      image: image.path,
      given: image.name,
      state,
      to,
      at: at(),
      ...extra,
    });
    const results = new Map<number, ImageResult>();
    const finish = async (image: BatchImage, result: ImageResult, extra: Partial<ManifestRecord> = {}) => {
      results.set(image.index, result);
      await manifest?.write(
        record(image, OUTCOME_STATE[result.outcome], {
          ...(result.from ? { from: result.from } : {}),
          ...(result.reason ? { reason: result.reason } : {}),
          ...(result.note ? { note: result.note } : {}),
          elapsedMs: Math.round(result.elapsedMs),
          ...extra,
        }),
      );
      emit({ type: 'image-end', image, result });
    };

    // Names that lead to no file: refused, without touching anything.
    const unresolvedImages: BatchImage[] = unresolved.map((u) => ({ index: u.index, name: u.name, path: u.path, aliases: [], device: '', size: 0 }));
    const items: Item[] = images.map((image) => ({ image, previous: previous.get(image.path) }));
    const all = [...images, ...unresolvedImages].sort((a, b) => a.index - b.index);
    emit({ type: 'start', to, images: all, limits, filesystems: new Set(images.map((i) => i.device)).size, ...(opts.manifest !== undefined ? { manifest: opts.manifest } : {}) });
    for (const [i, u] of unresolved.entries()) {
      await finish(unresolvedImages[i]!, { index: u.index, image: u.name, path: u.path, aliases: [], outcome: 'refused', to, elapsedMs: 0, reason: errorText(u.error), imageState: 'untouched' });
    }

    // Done in an earlier run: skipped once the file is seen to be the target (and not mid-conversion).
    const queue: Item[] = [];
    for (const item of items) {
      const prev = item.previous;
      if (prev?.state === 'done' && prev.to === to) {
        const journal = await storage.exists(journalPath(item.image.path));
        let isNow: string | undefined;
        let fmt: string | undefined;
        if (journal) isNow = 'mid-conversion (a journal is beside it)';
        else {
          fmt = await currentFormat(item.image.path, opts, storage).catch((e: unknown) => {
            isNow = `unreadable (${errorText(e)})`;
            return undefined;
          });
          isNow ??= fmt!;
        }
        if (fmt === to) {
          const r: ImageResult = { ...baseResult(item.image, to), outcome: 'skipped', from: prev.from ?? to, note: 'done in an earlier run' };
          results.set(item.image.index, r);
          emit({ type: 'image-end', image: item.image, result: r });
          continue;
        }
        item.note = `the manifest said done, but the file is ${isNow!} now; converting it again`;
      }
      queue.push(item);
    }
    // Every image still to do is pending, durably, before the first one starts.
    await manifest?.write(...queue.filter((q) => !(q.previous?.state === 'pending' && q.previous.to === to)).map((q) => record(q.image, 'pending')));

    const worker = async (item: Item) => {
      const { image } = item;
      const started = now();
      const base = baseResult(image, to);
      const elapsed = () => now() - started;
      const notes = (...more: (string | undefined)[]) => {
        const all = [item.note, ...more].filter((n): n is string => n !== undefined);
        return all.length ? { note: all.join('; ') } : {};
      };
      emit({ type: 'image-start', image });
      let recovered: RecoverReport | undefined;
      let from: string | undefined;
      try {
        if (opts.signal?.aborted) {
          await finish(image, { ...base, outcome: 'pending', elapsedMs: 0, reason: 'not started: the run was stopped', imageState: 'untouched' });
          return;
        }
        if (await storage.exists(journalPath(image.path))) {
          await manifest?.write(record(image, 'recovering'));
          emit({ type: 'image-recover', image });
          recovered = await recover(image.path, { drivers: opts.drivers, storage, onProgress: (event) => emit({ type: 'image-progress', image, event }) });
          emit({ type: 'image-recovered', image, report: recovered });
        }
        from = await currentFormat(image.path, opts, storage);
        if (from === to) {
          const finishedByRecovery = recovered?.action === 'rolled-forward';
          // The format it had before: known from the manifest when an earlier run started on it.
          const fromBefore = item.previous?.from ?? (finishedByRecovery ? undefined : to);
          const r: ImageResult = {
            ...base,
            outcome: finishedByRecovery ? 'converted' : 'skipped',
            ...(fromBefore ? { from: fromBefore } : {}),
            elapsedMs: elapsed(),
            ...(recovered ? { recovered } : {}),
            ...notes(
              finishedByRecovery
                ? `an interrupted conversion was finished by recovery (${recovered!.detail})`
                : item.previous?.state === 'converting' || item.previous?.state === 'recovering'
                  ? 'converted by the interrupted run'
                  : `already ${to}`,
            ),
          };
          await finish(image, r);
          return;
        }
        if (opts.signal?.aborted) {
          await finish(image, { ...base, outcome: 'pending', from, elapsedMs: elapsed(), reason: 'not started: the run was stopped', imageState: 'untouched', ...(recovered ? { recovered } : {}) });
          return;
        }
        await manifest?.write(record(image, 'converting', { from }));
        emit({ type: 'image-convert', image, from });
        const report = await convertInPlace(image.path, {
          to: opts.to,
          ...(opts.options ? { options: opts.options } : {}),
          ...(opts.format ? { format: opts.format } : {}),
          ...(opts.relocationWindow !== undefined ? { relocationWindow: opts.relocationWindow } : {}),
          drivers: opts.drivers,
          storage,
          ...(opts.signal ? { signal: opts.signal } : {}),
          onProgress: (event) => emit({ type: 'image-progress', image, event }),
        });
        await finish(
          image,
          {
            ...base,
            outcome: 'converted',
            from,
            elapsedMs: elapsed(),
            report,
            ...(recovered ? { recovered } : {}),
            ...notes(recovered ? `recovered first: ${recovered.detail}` : undefined),
          },
          { metadataBytes: report.written.metadataBytes, dataBytes: report.written.dataBytes, compactionBytes: report.written.compactionBytes },
        );
      } catch (e) {
        const c = await classify(e, image.path, storage, opts.signal);
        await finish(image, { ...base, ...c, ...(from ? { from } : {}), elapsedMs: elapsed(), ...(recovered ? { recovered } : {}), ...notes() });
      }
    };

    let failure: unknown;
    const started = await runScheduled(queue, (q) => q.image.device, limits, worker, opts.signal).catch((e: unknown) => {
      failure = e;
      return [] as Item[];
    });
    if (failure !== undefined) throw failure;
    const startedSet = new Set(started);
    for (const item of queue) {
      if (startedSet.has(item)) continue;
      // Never started (the run was stopped): still pending in the manifest, from the start.
      const r: ImageResult = { ...baseResult(item.image, to), outcome: 'pending', reason: 'not started: the run was stopped', imageState: 'untouched' };
      results.set(item.image.index, r);
      emit({ type: 'image-end', image: item.image, result: r });
    }

    const ordered = [...results.values()].sort((a, b) => a.index - b.index);
    const counts = emptyCounts();
    for (const r of ordered) counts[r.outcome]++;
    const report: BatchReport = {
      to,
      results: ordered,
      counts,
      ok: ordered.every((r) => r.outcome === 'converted' || r.outcome === 'skipped'),
      interrupted: opts.signal?.aborted === true,
      ...(opts.manifest !== undefined ? { manifest: resolve(opts.manifest) } : {}),
      elapsedMs: now() - t0,
    };
    emit({ type: 'end', report });
    return report;
  } finally {
    await manifest?.close();
  }
}

function baseResult(image: BatchImage, to: string): ImageResult {
  return { index: image.index, image: image.name, path: image.path, aliases: image.aliases, outcome: 'pending', to, elapsedMs: 0 };
}

/** The CLI's exit status for a batch: 0 all converted (or already so), 4 when an image needs recover, else 1. */
export function batchExitCode(report: BatchReport): number {
  if (report.ok) return 0;
  return report.counts['needs-recover'] > 0 ? 4 : 1;
}
