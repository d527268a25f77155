/**
 * Adoption: an image whose guest data lives in another file (a qcow2 external data file, a VMDK
 * monolithicFlat extent) → raw, without copying. When that data file holds every allocated cluster at
 * its guest offset, it *is* the raw disk once it reads zeros wherever the image reads zeros and has the
 * virtual size; renaming it over the image's name is then the whole conversion (DESIGN.md, "Adopting a
 * data file").
 *
 *   1. Zero, in the data file, every guest range the source reads as zero or unallocated but the file
 *      holds non-zero bytes there (stale bytes under qcow2 zero clusters); set its length to the
 *      virtual size (extended sparse, or cut where the source never reads); flush. The source never
 *      reads those bytes, so the image at its path is the same valid source throughout.
 *   2. Verify the data file read as raw against the source's mapping, by runs and holes.
 *   3. THE COMMIT POINT: rename(data file, image path), then fsync the directories. Before it the file
 *      at the image's path is the source; after it, the raw disk with the same guest content.
 *
 * To raw there is no journal: nothing to undo before the rename and nothing to finish after it, so
 * `recover` finds nothing pending. To another target a second step (raw → target) follows, and a journal
 * naming the data file and that step is durable before the rename, so `recover` can tell a rename that
 * did not happen (data file still there) from one that did (continue with the second step). The core knows only "the data is in another file" (SourceImage.dataDev) and
 * generic storage operations (Storage.rename, identify, syncDir); never a format's bytes.
 */
import { basename, dirname } from 'node:path';
import { fileStorage, type Storage } from '../blockdev/storage.js';
import { HOLE_BLOCK, isAllZero } from '../blockdev/sparse.js';
import type { BlockDevice } from '../blockdev/types.js';
import { OverlayDevice } from '../blockdev/overlay.js';
import { CARRIED_LABELS, type CarriedField, type SourceImage, type TargetOptions } from '../driver.js';
import type { ExtentMap } from '../extent-map.js';
import { ImgconvError, IoError, UnsupportedError, UsageError } from '../errors.js';
import { findDriver, openImage, probe, resolveRelated } from '../image.js';
import { combinePlans, combineReports, continueStages, ConversionFailedError, planRoute, type ConversionPlan, type ConversionReport, type ConvertOptions, type JournalHandle, type Phase } from './convert.js';
import { encodeRecord, journalPath, regionsDigest } from './journal.js';
import { identityEquivalent, readTopLayer } from './mapping.js';

/** What an adoption does; `imgconv plan` prints it and the report carries it. */
export interface AdoptionSummary {
  /** The data file that becomes the raw disk (its name is gone afterwards). */
  dataFile: string;
  /** Bytes of the data file zeroed (hole punched) where the image reads zeros over stale bytes. */
  zeroBytes: number;
  /** The data file's length before, and after (the virtual size). */
  lengthBefore: number;
  lengthAfter: number;
  /** The commit point: the data file is renamed to this (the image's path). */
  renamedTo: string;
}

/**
 * Thrown by the engine's `prepare` when the source's data lives in another file that can be adopted
 * and the target is raw: the conversion is an adoption, not the commit protocol. Not an ImgconvError, so
 * no route chooser takes it for a refusal.
 */
export class AdoptDataFile extends Error {
  constructor(
    /** Another target: after the adoption a second step converts the raw disk to it. */
    readonly then?: { to: string; options: TargetOptions },
  ) {
    super('the source can be converted to raw by adopting its data file');
    this.name = 'AdoptDataFile';
  }
}

interface Range {
  start: number;
  length: number;
}

/** A source whose data file holds every allocated cluster at its guest offset: the condition for adoption. */
function identityPlaced(mapping: ExtentMap): boolean {
  return [...mapping].every((e) => e.kind !== 'compressed' && (e.kind !== 'data' || e.host === e.guest));
}

const shellQuote = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);

/**
 * Called by the engine for a source with `dataDev !== dev`, before any write. Returns the refusal to
 * throw, or throws AdoptDataFile when the data file can be adopted (to raw; another target follows it).
 */
export async function dataFileSource(path: string, source: SourceImage, mapping: ExtentMap, opts: ConvertOptions): Promise<UnsupportedError | UsageError> {
  const { info } = source;
  const base = 'an image whose data lives in another file converts only by adopting that file as the raw disk, which needs every cluster at its guest offset';
  const name = source.dataFile;
  if (name === undefined || info.backing || !identityPlaced(mapping)) {
    const why = name === undefined ? 'the data file has no name' : info.backing ? 'the image has a backing file' : 'its data file does not hold every cluster at its guest offset (or holds compressed clusters)';
    return new UnsupportedError(info.format, 'external data file', `${base}; ${why}: copy it with qemu-img convert`);
  }
  const storage = opts.storage ?? fileStorage;
  const dataPath = resolveRelated(path, name);
  const other = await sameFileSystemRefusal(path, dataPath, source, opts, storage);
  if (other) return other;
  if (opts.to === 'raw') {
    if (Object.keys(opts.options ?? {}).length > 0) return new UsageError(`raw takes no options (${Object.keys(opts.options ?? {}).join(', ')})`);
    throw new AdoptDataFile();
  }
  if (opts.to === info.format && opts.options?.subformat !== undefined && opts.options.subformat === info.subformat) {
    return new UsageError(`${path} is already ${opts.to} ${info.subformat}; nothing to do`);
  }
  // Another target: two steps, the adoption and then raw → target (planned before any write).
  throw new AdoptDataFile({ to: opts.to, options: opts.options ?? {} });
}

/**
 * The rename is the commit point, so the data file must be a regular file on the image's file system
 * (and not the image itself). Otherwise the refusal gives the commands that keep the data file as the
 * raw disk under its own name (qemu-img compare proves it reads as the image before the image goes).
 */
async function sameFileSystemRefusal(path: string, dataPath: string, source: SourceImage, opts: ConvertOptions, storage: Storage): Promise<UnsupportedError | undefined> {
  const { info } = source;
  const [img, data] = await Promise.all([storage.identify(path), storage.identify(dataPath)]);
  if (img.device === data.device && img.inode === data.inode) return new UnsupportedError(info.format, 'external data file', `the data file ${dataPath} is the image itself`);
  // rename(2) renames a link, not the file it points to: the link would become the disk, the file keep its name.
  if (img.symlink || data.symlink) {
    return new UnsupportedError(info.format, 'external data file', `${img.symlink ? path : dataPath} is a symbolic link; adopting the data file renames it over the image, which would replace the link, not its file: run imgconv on the files the links point to`);
  }
  if (data.regular && img.device === data.device) return undefined;
  const why = !data.regular ? `the data file ${dataPath} is not a regular file, so it cannot be renamed to the image's name` : `the data file ${dataPath} is on another file system than ${path}, so it cannot be renamed to the image's name`;
  const driver = findDriver(opts.drivers, info.format);
  const q = shellQuote;
  const image = q(basename(path));
  const d = q(source.dataFile!);
  const then = opts.to === 'raw' ? '' : `; then: imgconv inplace --to ${opts.to}${Object.keys(opts.options ?? {}).length ? ` -o ${Object.entries(opts.options ?? {}).map(([k, v]) => `${k}=${v}`).join(',')}` : ''} -f raw ${d}`;
  return new UnsupportedError(
    info.format,
    'external data file',
    `${why}. It holds every allocated cluster at its guest offset, so it is the raw disk itself once it has the virtual size and reads zeros where the image does (qemu-img compare checks that; it fails when the image marks zeros over stale bytes, and then only qemu-img convert helps). To keep the data file as the raw disk and delete the ${info.format} file, run in ${dirname(path)}: truncate -s ${info.virtualSize} ${d} && qemu-img compare -f ${driver.qemuName ?? driver.name} -F raw ${image} ${d} && sync ${d} && rm ${image}${then}`,
  );
}

/** Everything decided before the first write: the plan, and what the execution needs. */
interface Adoption {
  plan: ConversionPlan;
  /** The second step's plan (raw → the target), made on a view of the data file as the adoption leaves it. */
  second?: ConversionPlan;
  summary: AdoptionSummary;
  zero: Range[];
  expected: ExtentMap;
  dataLength: number;
}

/**
 * The guest ranges the source reads as zeros (zero or unallocated runs) where the data file holds
 * non-zero bytes: found by the file's holes first (SEEK_DATA/SEEK_HOLE), then by reading only what is
 * not a hole, in 4 KiB blocks (clipped to the range).
 */
async function staleRanges(dataDev: BlockDevice, mapping: ExtentMap, dataLength: number): Promise<Range[]> {
  const out: Range[] = [];
  const push = (start: number, end: number) => {
    const last = out[out.length - 1];
    if (last && last.start + last.length === start) last.length += end - start;
    else out.push({ start, length: end - start });
  };
  const buf = new Uint8Array(1 << 20);
  for (const e of mapping) {
    if (e.kind === 'data') continue;
    const end = Math.min(e.guest + e.length, dataLength);
    let pos = e.guest;
    while (pos < end) {
      const data = await dataDev.nextData(pos);
      if (data === null || data >= end) break;
      const hole = Math.min(await dataDev.nextHole(data), end);
      for (let at = data; at < hole; ) {
        const n = Math.min(buf.length, hole - at);
        const view = buf.subarray(0, n);
        view.fill(0);
        let got = 0;
        while (got < n) {
          const r = await dataDev.read(view.subarray(got), at + got);
          if (r === 0) break;
          got += r;
        }
        if (!isAllZero(view)) {
          for (let b = at; b < at + n; ) {
            const bEnd = Math.min(at + n, (Math.floor(b / HOLE_BLOCK) + 1) * HOLE_BLOCK);
            if (!isAllZero(view.subarray(b - at, bEnd - at))) push(b, bEnd);
            b = bEnd;
          }
        }
        at += n;
      }
      pos = hole;
    }
  }
  return out;
}

/** Plans an adoption of the image at `path` (opened as `dev`), reading only. */
async function planAdoption(path: string, dev: BlockDevice, opts: ConvertOptions, storage: Storage, then?: AdoptDataFile['then']): Promise<Adoption> {
  const chain = await openImage(path, { drivers: opts.drivers, format: opts.format, topDevice: dev, backing: false, opener: (p, o) => storage.open(p, { ...o, write: false }) });
  try {
    const source = chain.layers[0]!;
    const { info } = source;
    const mapping = await source.mapping();
    const dataPath = resolveRelated(path, source.dataFile!);
    const V = info.virtualSize;
    const dataLength = await source.dataDev.size();
    const zero = await staleRanges(source.dataDev, mapping, dataLength);
    const zeroBytes = zero.reduce((s, r) => s + r.length, 0);
    await refuseProbeTrap(path, source, mapping, opts);
    const summary: AdoptionSummary = { dataFile: dataPath, zeroBytes, lengthBefore: dataLength, lengthAfter: V, renamedTo: path };
    const plan: ConversionPlan = {
      image: path,
      source: { format: info.format, virtualSize: V, fileLength: await dev.size() },
      target: { format: 'raw', parameters: {} },
      metadataBytes: 0,
      moves: [],
      dataMoveBytes: 0,
      compactionMoveBytes: 0,
      peakExtraBytes: 0,
      finalLength: V,
      dropped: [
        ...(info.notCarried ?? []).filter((f) => f.action === 'drop').map((f) => f.feature),
        ...Object.entries(info.carried ?? {}).map(([k, v]) => `${CARRIED_LABELS[k as CarriedField]} (${v})`),
      ],
      adoption: summary,
    };
    let second: ConversionPlan | undefined;
    if (then) {
      // The data file as the adoption leaves it: the virtual size, the stale ranges punched (zeros, holes).
      const view = new OverlayDevice(source.dataDev, [], V, zero);
      try {
        // The route chooser's choice, as the conversion's step after the rename makes it (continueStages).
        second = await planRoute(path, view, { ...opts, format: 'raw', to: then.to, options: then.options });
      } catch (e) {
        if (!(e instanceof ImgconvError) || e instanceof IoError) throw e;
        throw new UnsupportedError(info.format, 'external data file', `adopting its data file ${source.dataFile} would make ${path} raw (no copy), but raw → ${then.to} is refused: ${(e as Error).message}`);
      }
    }
    return { plan, summary, zero, expected: mapping, dataLength, ...(second ? { second } : {}) };
  } finally {
    await chain.close();
  }
}

/**
 * The data file becomes a file whose first bytes are the guest's; when they would probe as another
 * format (a disk holding an image, a sector with a magic), the raw result is a probe trap: refused
 * before any write, as for the engine's other identity targets.
 */
async function refuseProbeTrap(path: string, source: SourceImage, mapping: ExtentMap, opts: ConvertOptions): Promise<void> {
  const V = mapping.virtualSize;
  const head = Math.min(V, 65536);
  const tail = Math.max(0, V - 512);
  const view = new OverlayDevice(
    source.dataDev,
    [
      { offset: 0, bytes: await readTopLayer(source, mapping, 0, head) },
      { offset: tail, bytes: await readTopLayer(source, mapping, tail, V - tail) },
    ],
    V,
  );
  const probed = await probe(view, opts.drivers);
  if (probed.driver.name !== 'raw') {
    throw new UnsupportedError(
      source.format,
      'guest data that looks like another format',
      `the disk's first or last bytes read as a ${probed.driver.name} image; as a raw file ${path} would be taken for something else by anything that probes it (imgconv, qemu-img). Convert to a format with its own header (qcow2, QED, VMDK, VHD dynamic) with qemu-img convert instead`,
    );
  }
}

/** `imgconv plan` / `inplace --dry-run` for an adoption (and the step after it): reads only. */
export async function planAdoptionOf(path: string, dev: BlockDevice, opts: ConvertOptions, then?: AdoptDataFile['then']): Promise<ConversionPlan> {
  const a = await planAdoption(path, dev, opts, opts.storage ?? fileStorage, then);
  return a.second ? twoSteps(combinePlans(a.plan, a.second), a.plan, a.second) : a.plan;
}

/** The adoption adds no disk space (the data file exists already): a two-step peak is the second step's. */
function twoSteps<T extends ConversionPlan | ConversionReport>(whole: T, a: { peakExtraBytes: number }, b: { peakExtraBytes: number }): T {
  return { ...whole, peakExtraBytes: Math.max(a.peakExtraBytes, b.peakExtraBytes) };
}

/**
 * Converts by adoption. `dev` is the image, opened for writing with its lock (it is never written);
 * the data file is opened for writing with its own lock. With `then`, a second step converts the raw
 * disk to that target: a journal holding the adoption's PREPARE (and `then`) is made durable before the
 * rename, so that `recover` after a crash between the steps tells a done rename from a pending one (by
 * the data file's name) and runs the second step.
 */
export async function adoptDataFile(path: string, dev: BlockDevice, opts: ConvertOptions, then?: AdoptDataFile['then']): Promise<ConversionReport> {
  const storage = opts.storage ?? fileStorage;
  const progress = (phase: Phase, done: number, total: number) => opts.onProgress?.({ phase, bytesDone: done, bytesTotal: total });
  let adoption: Adoption;
  try {
    progress('analyse', 0, 1);
    adoption = await planAdoption(path, dev, opts, storage, then);
    progress('plan', 1, 1);
  } catch (e) {
    await dev.close().catch(() => {});
    // Planning only reads: an I/O error leaves every file byte-identical (as convertInPlace says for its own).
    if (e instanceof IoError && e.code !== 'ENOENT') throw new ConversionFailedError('untouched', `conversion failed before anything was written: ${e.message}; ${path} is unchanged`, e);
    throw e;
  }
  const { plan, summary, zero, expected } = adoption;
  const dataPath = summary.dataFile;
  const V = summary.lengthAfter;
  const jpath = journalPath(path);
  const journal: JournalHandle = { dev: undefined, end: 0 };
  let data: BlockDevice | undefined;
  let committed = false;
  /** Set before the first change to the data file (none of which the source can see). */
  let touched = false;
  try {
    opts.signal?.throwIfAborted();
    data = await storage.open(dataPath, { write: true, lock: true });
    // The plan read the data file before its lock was taken: it must not have changed length since.
    if ((await data.size()) !== adoption.dataLength) throw new ImgconvError(`${dataPath} changed while the conversion was planned`);
    // 1. Zeros where the source reads zeros over stale bytes; the length of the disk. Invisible to the source.
    let done = 0;
    touched = true;
    progress('write', 0, summary.zeroBytes);
    for (const r of zero) {
      opts.signal?.throwIfAborted();
      await data.punchHole(r.start, r.length);
      done += r.length;
      progress('write', done, summary.zeroBytes);
    }
    if (adoption.dataLength !== V) await data.truncate(V);
    await data.flush();
    // 2. Verify: the data file, read as raw, must read what the source reads. (Reported as part of the
    //    commit phase: the progress views show phases in the engine's order, where verify follows commit.)
    progress('commit', 0, 1);
    await verifyAdopted(dataPath, data, expected, V, opts);
    opts.signal?.throwIfAborted();
    if (then) {
      // A second step follows: the journal says so before the rename (recover finishes from there).
      journal.dev = await storage.create(jpath);
      const rec = encodeRecord({
        type: 'prepare',
        sourceFormat: plan.source.format,
        targetFormat: 'raw',
        originalLength: plan.source.fileLength,
        sourceDigest: regionsDigest([]),
        undo: [],
        plan: {
          virtualSize: V,
          backing: null,
          moves: [],
          metadataBytes: 0,
          dataMoveBytes: 0,
          finalLength: V,
          adoption: { dataFile: dataPath },
          // The window the second step runs with, when recovery runs it (informational: journal.ts).
          ...(opts.relocationWindow !== undefined ? { relocationWindow: opts.relocationWindow } : {}),
        },
        then,
      });
      await journal.dev.write(rec, 0);
      journal.end = rec.length;
      await journal.dev.flush();
      await storage.syncDir(jpath);
    }
    // 3. THE COMMIT POINT: the data file takes the image's name.
    await storage.rename(dataPath, path);
    committed = true;
    await storage.syncDir(path);
    if (dirname(dataPath) !== dirname(path)) await storage.syncDir(dataPath);
    progress('commit', 1, 1);
  } catch (e) {
    await data?.close().catch(() => {});
    await dev.close().catch(() => {});
    await journal.dev?.close().catch(() => {});
    if (committed) {
      // The rename happened; only making it durable failed. The file at the path is the raw disk.
      if (then) throw new ConversionFailedError('needs-recover', `${path} is now raw (its data file ${dataPath} was adopted), but syncing the directory failed: ${(e as Error).message}; finish the conversion to ${then.to} with: imgconv recover ${path}`, e);
      throw new ConversionFailedError('converted', `${path} is now raw (its data file ${dataPath} was adopted), but syncing the directory failed: ${(e as Error).message}; run sync`, e);
    }
    // Before the rename the journal says nothing that needs doing: remove it (recover would, too).
    let journalLeft = false;
    if (journal.dev) await storage.remove(jpath).then(() => storage.syncDir(jpath)).catch(() => (journalLeft = true));
    // A refusal before any change (the data file is locked by a VM, it changed meanwhile) keeps its own error.
    if (!touched && !journalLeft && e instanceof ImgconvError && !(e instanceof IoError)) throw e;
    const cancelled = e instanceof Error && (e.name === 'AbortError' || (e as { code?: string }).code === 'ABORT_ERR');
    const what = `${path} is unchanged (${plan.source.format})${touched ? ` and reads the same (its data file ${dataPath} may have been zeroed where the image reads zeros, or changed length past what the image reads)` : ''}`;
    throw new ConversionFailedError(
      journalLeft ? 'needs-recover' : 'untouched',
      `${cancelled ? 'cancelled' : `conversion failed (${(e as Error).message})`} before the commit point; ${what}${journalLeft ? `; remove the journal with: imgconv recover ${path}` : ''}`,
      e,
    );
  }
  // After the rename: the data was synced before it, so an error closing (close(2) on NFS) changes nothing.
  // The image's old file (the metadata, now unlinked) goes; the data file's device stays open when a step
  // follows: it holds the lock, which lives on the inode the image's name now gives.
  await dev.close().catch(() => {});
  const first: ConversionReport = {
    ...plan,
    steps: undefined,
    written: { metadataBytes: 0, dataBytes: 0, compactionBytes: 0 },
    // The metadata file is gone, and the data file no longer holds what lay past the virtual size.
    reclaimedBytes: plan.source.fileLength + Math.max(0, summary.lengthBefore - V),
    verified: ['probes as raw', 'virtual size unchanged', 'guest content identical (by runs and holes)'],
  };
  if (!then) {
    await data.close().catch(() => {});
    return first;
  }
  // The rest, from the raw disk, appending to the same journal, on the device locked since before the
  // rename: reopening the image's path would leave it unlocked in between (and a second open description
  // of the inode would conflict with the first's OFD lock). The route chooser picks the way (raw → VHD
  // dynamic: through VMDK), as the plan did on the view of the data file.
  const rest = await continueStages(path, renamedDevice(data, path), storage, { ...opts, to: then.to, options: then.options }, journal, undefined, 'raw');
  return twoSteps(combineReports(first, rest), first, rest);
}

/**
 * `dev`, opened under the name a rename has since replaced, under its new name `path`: messages and
 * I/O errors name the image (the engine tells a failed flush of the image by the error's path).
 */
function renamedDevice(dev: BlockDevice, path: string): BlockDevice {
  const named = (e: unknown): never => {
    if (!(e instanceof IoError) || e.path !== dev.path) throw e;
    const prefix = `${e.op} ${e.path} at offset ${e.offset}: `;
    const renamed = new IoError(e.op, path, e.offset, e.code, e.message.startsWith(prefix) ? e.message.slice(prefix.length) : e.message);
    throw Object.assign(renamed, { cause: e });
  };
  const op =
    <A extends unknown[], R>(f: (...a: A) => Promise<R>) =>
    (...a: A): Promise<R> =>
      f(...a).catch(named);
  return {
    path,
    get writable() {
      return dev.writable;
    },
    size: op(() => dev.size()),
    allocated: op(() => dev.allocated()),
    read: op((b: Uint8Array, o: number) => dev.read(b, o)),
    write: op((b: Uint8Array, o: number) => dev.write(b, o)),
    flush: op(() => dev.flush()),
    ...(dev.startWriteback ? { startWriteback: (o: number, n: number) => dev.startWriteback!(o, n) } : {}),
    truncate: op((n: number) => dev.truncate(n)),
    punchHole: op((o: number, n: number) => dev.punchHole(o, n)),
    nextData: op((o: number) => dev.nextData(o)),
    nextHole: op((o: number) => dev.nextHole(o)),
    close: op(() => dev.close()),
  };
}

class VerificationFailed extends ImgconvError {}

async function verifyAdopted(dataPath: string, data: BlockDevice, expected: ExtentMap, V: number, opts: ConvertOptions): Promise<void> {
  const probed = await probe(data, opts.drivers);
  if (probed.driver.name !== 'raw') throw new VerificationFailed(`the data file probes as ${probed.driver.name}, not raw`);
  if ((await data.size()) !== V) throw new VerificationFailed(`the data file is ${await data.size()} bytes, not the virtual size ${V}`);
  const chain = await openImage(dataPath, { drivers: opts.drivers, format: 'raw', topDevice: data, backing: false });
  try {
    const img = chain.layers[0]!;
    if (img.info.virtualSize !== V) throw new VerificationFailed(`as raw it has virtual size ${img.info.virtualSize}, not ${V}`);
    const diff = await identityEquivalent(expected, await img.mapping(), data);
    if (diff) throw new VerificationFailed(`the data file does not read as the image: ${diff}`);
  } finally {
    await chain.close();
  }
}
