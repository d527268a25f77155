/**
 * The dry run of a batch (`imgconv plan IMAGE...`, `imgconv inplace --dry-run IMAGE...`): every
 * image's plan, refusal or reason to skip, and the extra space the batch needs on each filesystem,
 * so an operator can check a datastore before the maintenance window. Reads only.
 */
import { fileStorage } from '../blockdev/storage.js';
import { planConversion, type ConversionPlan } from '../engine/convert.js';
import { journalPath } from '../engine/journal.js';
import { findDriver, probe } from '../image.js';
import { nodeBatchFileSystem, type BatchFileSystem } from './files.js';
import { resolveImages, type BatchImage } from './images.js';
import { latestStates, readManifest, type ManifestIo } from './manifest.js';
import { errorText, type ConvertManyOptions } from './run.js';
import { runScheduled, scheduleLimits } from './schedule.js';

export type PlanOutcome = 'convert' | 'skip' | 'refused' | 'needs-recover';

export interface PlanRow {
  index: number;
  image: string;
  path: string;
  aliases: string[];
  outcome: PlanOutcome;
  from?: string;
  to: string;
  plan?: ConversionPlan;
  /** Why it is refused, skipped or must be recovered first. */
  reason?: string;
  /** The filesystem (lane) it lives on; '' when the name leads to no file. */
  device: string;
}

export interface FilesystemNeed {
  device: string;
  /** A path on it, to name it. */
  example: string;
  images: number;
  /**
   * Extra bytes the conversions on it may need: the sum of their peaks, because a conversion's growth
   * of its file stays after it ends (only compaction's scratch space is given back).
   */
  peakExtraBytes: number;
  /** What the filesystem has free now, when known. */
  freeBytes?: number;
}

export interface BatchPlan {
  to: string;
  rows: PlanRow[];
  counts: Record<PlanOutcome, number>;
  /** Sum of every convertible image's peak extra space. */
  totalPeakExtraBytes: number;
  /** Data every conversion moves: before its commit point, and after it to compact (QED). */
  totalMoveBytes: number;
  totalMetadataBytes: number;
  filesystems: FilesystemNeed[];
}

export type PlanManyOptions = Omit<ConvertManyOptions, 'onEvent' | 'manifest'> & {
  /** A manifest to read (never written by a dry run): its images join the names given. */
  manifest?: string;
  manifestIo?: ManifestIo;
  files?: BatchFileSystem;
};

export async function planMany(names: readonly string[], opts: PlanManyOptions): Promise<BatchPlan> {
  const storage = opts.storage ?? fileStorage;
  const files = opts.files ?? nodeBatchFileSystem;
  const to = findDriver(opts.drivers, opts.to).name;
  const all = names.slice();
  if (opts.manifest !== undefined) {
    const given = new Set(names.map((n) => files.absolute(n)));
    for (const r of latestStates(await readManifest(opts.manifest, opts.manifestIo)).values()) {
      if (given.has(r.image)) continue;
      all.push(files.absolute(r.given) === r.image ? r.given : r.image);
      given.add(r.image);
    }
  }
  const { images, unresolved } = await resolveImages(all, files);
  const rows: PlanRow[] = unresolved.map((u) => ({ index: u.index, image: u.name, path: u.path, aliases: [], outcome: 'refused', to, reason: errorText(u.error), device: '' }));

  const planOne = async (image: BatchImage) => {
    const row: PlanRow = { index: image.index, image: image.name, path: image.path, aliases: image.aliases, outcome: 'refused', to, device: image.device };
    rows.push(row);
    try {
      if (await storage.exists(journalPath(image.path))) {
        row.outcome = 'needs-recover';
        row.reason = `an interrupted conversion (${journalPath(image.path)}) is recovered first; plan again after that`;
        return;
      }
      let from: string;
      if (opts.format) from = findDriver(opts.drivers, opts.format).name;
      else {
        const dev = await storage.open(image.path, { write: false });
        try {
          from = (await probe(dev, opts.drivers)).driver.name;
        } finally {
          await dev.close();
        }
      }
      row.from = from;
      if (from === to) {
        row.outcome = 'skip';
        row.reason = `already ${to}`;
        return;
      }
      row.plan = await planConversion(image.path, { to: opts.to, options: opts.options ?? {}, format: opts.format, drivers: opts.drivers, storage, ...(opts.relocationWindow !== undefined ? { relocationWindow: opts.relocationWindow } : {}) });
      row.outcome = 'convert';
    } catch (e) {
      row.outcome = 'refused';
      row.reason = errorText(e);
    }
  };
  // Planning reads metadata: the same lanes as converting, so a dry run loads a datastore the way the run will.
  await runScheduled(images, (i) => i.device, scheduleLimits(opts.jobs), planOne, opts.signal);
  rows.sort((a, b) => a.index - b.index);

  const counts: Record<PlanOutcome, number> = { convert: 0, skip: 0, refused: 0, 'needs-recover': 0 };
  const byDevice = new Map<string, FilesystemNeed>();
  let totalPeakExtraBytes = 0;
  let totalMoveBytes = 0;
  let totalMetadataBytes = 0;
  for (const r of rows) {
    counts[r.outcome]++;
    if (!r.plan) continue;
    totalPeakExtraBytes += r.plan.peakExtraBytes;
    totalMoveBytes += r.plan.dataMoveBytes + r.plan.compactionMoveBytes;
    totalMetadataBytes += r.plan.metadataBytes;
    const fs = byDevice.get(r.device) ?? { device: r.device, example: r.path, images: 0, peakExtraBytes: 0 };
    fs.images++;
    fs.peakExtraBytes += r.plan.peakExtraBytes;
    byDevice.set(r.device, fs);
  }
  const filesystems = [...byDevice.values()];
  for (const fs of filesystems) {
    const free = await files.freeBytes(fs.example);
    if (free !== undefined) fs.freeBytes = free;
  }
  return { to, rows, counts, totalPeakExtraBytes, totalMoveBytes, totalMetadataBytes, filesystems };
}
