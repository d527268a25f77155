/**
 * In-place conversion: the one place where the commit protocol lives (DESIGN.md, "Commit protocol").
 * Format-agnostic: the source driver gives the mapping and the host-space map, the target driver lays
 * out and encodes new metadata, and this file decides ordering — what is written where, when it is
 * flushed, and the single commit point (the durable COMMIT record in the journal).
 */
import type { BlockDevice, DeviceOpener } from '../blockdev/types.js';
import { dirname, join } from 'node:path';
import { fileStorage, type Storage } from '../blockdev/storage.js';
import { CARRIED_LABELS, type CarriedField, type FormatDriver, type HostWrite, type PlanInput, type SourceImage, type TargetDriver, type TargetOptions, type TargetPlan, type TargetBuild, type ImageInfo } from '../driver.js';
import { ExtentMap, type Extent } from '../extent-map.js';
import type { HostSpace } from '../host-space.js';
import { ImgconvError, IoError, UnsupportedError, UsageError } from '../errors.js';
import { alignUp } from '../binary.js';
import { findDriver, openImage, probe, type ImageChain } from '../image.js';
import { checkImage } from '../check.js';
import { GapAllocator } from './allocator.js';
import { encodeRecord, journalPath, MAX_BINARY, regionsDigest, type Region } from './journal.js';
import { guestEquivalent, readTopLayer } from './mapping.js';
import { holesAsData, scanHoles } from './holes.js';
import { compact, estimateCompaction } from './compact.js';
import { NeedsIntermediateError, planIdentity, type IdentityPlan } from './identity.js';
import { DEFAULT_WINDOW, executeRelocation, identityPeakExtra, planMoveRelocation, type MoveTarget, type RelocationPlan, type Unit } from './relocate.js';
import { identityEquivalent } from './mapping.js';
import { OverlayDevice } from '../blockdev/overlay.js';
import { writeIntoFree } from '../blockdev/sparse.js';
import { FreeSpaceCopier, gatherRuns, type CopyRun } from '../blockdev/copy.js';
import { AdoptDataFile, adoptDataFile, dataFileSource, planAdoptionOf, type AdoptionSummary } from './adopt.js';

export type Phase = 'analyse' | 'plan' | 'move' | 'write' | 'commit' | 'verify' | 'reclaim';
export const PHASES: readonly Phase[] = ['analyse', 'plan', 'move', 'write', 'commit', 'verify', 'reclaim'];

export interface ProgressEvent {
  phase: Phase;
  bytesDone: number;
  bytesTotal: number;
}

export interface ConvertOptions {
  /** Target format name. */
  to: string;
  options?: TargetOptions;
  /** Source format (skips probing). */
  format?: string;
  drivers: readonly FormatDriver[];
  storage?: Storage;
  onProgress?: (e: ProgressEvent) => void;
  /** Cancels before the commit point (rolled back); after it the conversion completes. */
  signal?: AbortSignal;
  /**
   * Bytes of second copies on disk at once while data is relocated inside the source (a round's size;
   * DEFAULT_WINDOW, 64 MiB, by default): relocation for identity targets (raw, VHD fixed, VMDK flat),
   * moves to a non-identity target (VHD dynamic), and the batches of compaction after the commit.
   */
  relocationWindow?: number;
}

export interface DataMove {
  guest: number;
  length: number;
  /** Where the data lies now (a data run's host offset), or undefined when it is zeros/compressed. */
  from?: number;
  to: number;
  reason: string;
}

export interface ConversionPlan {
  image: string;
  source: { format: string; virtualSize: number; fileLength: number; backing?: string };
  target: { format: string; parameters: TargetPlan['parameters'] };
  /** Bytes of new metadata written before the commit (tables) and at it (fixed regions). */
  metadataBytes: number;
  moves: DataMove[];
  dataMoveBytes: number;
  /**
   * Bytes moved after the commit to leave no unreferenced space inside the file, where the target's
   * checker would count it as leaked (QED): the new tables, twice, and data from the tail into holes.
   */
  compactionMoveBytes: number;
  /** Most the file grows beyond its original length during the conversion. */
  peakExtraBytes: number;
  /**
   * Identity targets (raw, VHD fixed): data relocated inside the source before the commit, in rounds
   * (copy → flush → repoint → flush), through a scratch window past the end; the commit record carries
   * the guest bytes of the ranges the source's own structures occupy (`commitBytes`, twice: new and old).
   */
  relocation?: { rounds: number; scratchPeakBytes: number; commitBytes: number };
  /**
   * A conversion in two steps, through an intermediate format that can relocate its data: each step's
   * own plan (the second planned on a view of the image the first leaves; the first step's reclaim may
   * still change that layout a little). The fields above are then the totals, from the original
   * source to the final target.
   */
  steps?: ConversionPlan[];
  finalLength: number;
  dropped: string[];
  /** A file the conversion creates beside the image (VMDK monolithicFlat: the descriptor; the image becomes its raw extent). */
  companion?: string;
  /** Two-step conversions: every intermediate format compared, with the bytes it would move or why it cannot serve. */
  alternatives?: RouteAlternative[];
  /** An image whose data lives in another file → raw: that file is zeroed where needed and renamed to the image (src/engine/adopt.ts). */
  adoption?: AdoptionSummary;
}

export interface ConversionReport extends Omit<ConversionPlan, 'steps'> {
  /** Two-step conversions: each step's report; the fields above are the totals. */
  steps?: ConversionReport[];
  /** dataBytes: moved before the commit; compactionBytes: moved after it to leave no leaked space. */
  written: { metadataBytes: number; dataBytes: number; compactionBytes: number };
  reclaimedBytes: number;
  verified: string[];
}

/** Everything decided before the first write. Pure with respect to the image. */
interface Prepared {
  chain: ImageChain;
  source: SourceImage;
  target: TargetDriver;
  targetPlan: TargetPlan;
  input: PlanInput;
  moves: DataMove[];
  movedMapping: ExtentMap;
  writes: HostWrite[];
  fixed: HostWrite[];
  finalLength: number;
  plan: ConversionPlan;
  /** Set once the journal's prepare record is written (relocating: once the commit record is). */
  undo: Region[];
  /** Identity targets: the relocation and what the commit carries. */
  identity?: IdentityPlan;
  /**
   * Moves done inside a relocatable source (QED, VMDK sparse) in rounds instead of copies made before
   * the commit: the source is repointed round by round and the old places punched, so the disk never
   * holds more than a round of second copies. `zero`: the moves' destinations, punched first (a free gap
   * may hold stale bytes where the moved range reads zeros).
   */
  moveRelocation?: { units: Unit[]; plan: RelocationPlan; zero: { start: number; length: number }[] };
  /** The file created beside the image at the commit point, and its bytes. */
  companion?: { path: string; bytes: Uint8Array };
  /** Whether zero runs over file holes were mapped as data (recovery must derive the same mapping). */
  holesAsData: boolean;
}

/**
 * `intermediate`: the first step of two, whose result reclaim does not compact. `shared`: the source as
 * every route from this device sees it (opened and read once); without it the source is opened here.
 */
async function prepare(path: string, dev: BlockDevice, opts: ConvertOptions, intermediate = false, shared?: SourceAnalysis): Promise<Prepared> {
  const targetDriver = findDriver(opts.drivers, opts.to);
  if (!targetDriver.target) throw new UsageError(`${opts.to} cannot be a conversion target yet`);
  const analysis = shared ?? new SourceAnalysis(path, dev, opts);
  let chain: ImageChain;
  try {
    chain = await analysis.open();
  } finally {
    // Unshared: the chain's handle is now the only owner.
    if (!shared) await analysis.release();
  }
  try {
    const source = chain.layers[0]!;
    const info = source.info;
    // Within one format only a change the options ask for (VHD dynamic → fixed, VMDK streamOptimized →
    // monolithicSparse, a qcow2 option) is a conversion.
    const sameFormat = info.format === opts.to;
    if (sameFormat && Object.keys(opts.options ?? {}).length === 0) throw new UsageError(`${path} is already ${opts.to}; nothing to do`);
    if (info.corrupt) throw new UnsupportedError(info.format, 'corrupt image', 'the image is marked corrupt; repair it first (qemu-img check -r all)');
    if (info.dirty) throw new UnsupportedError(info.format, 'dirty image', 'the image was not closed cleanly; run qemu-img check -r all on it first');
    for (const f of info.notCarried ?? []) {
      if (f.action === 'refuse') throw new UnsupportedError(info.format, f.feature, `${f.detail}; a conversion cannot carry it`);
    }
    // Data in another file: to raw by adopting that file (AdoptDataFile, src/engine/adopt.ts), else refused.
    if (source.dataDev !== source.dev) throw await dataFileSource(path, source, await source.mapping(), opts);
    const fileLength = await dev.size();
    const holesToData = targetDriver.target.holesAsData?.(opts.options ?? {}) ?? true;
    const mapping = holesToData ? await analysis.mappingWithHoles() : await analysis.mapping();
    const hostSpace = await analysis.hostSpace();
    // Targets write the backing format into the new image, where QEMU reads it: QEMU's name for it.
    const backingDriver = info.backing?.format !== undefined ? findDriver(opts.drivers, info.backing.format) : undefined;
    const planInfo = backingDriver ? { ...info, backing: { ...info.backing!, format: backingDriver.qemuName ?? backingDriver.name } } : info;
    const backingInfo = info.backing ? await analysis.backingInfo() : undefined;
    const input: PlanInput = { path, info: planInfo, mapping, hostSpace, fileSize: fileLength, options: opts.options ?? {}, ...(backingInfo ? { backingInfo } : {}) };
    const targetPlan = targetDriver.target.plan(input);
    const companionPath = targetPlan.companion !== undefined ? join(dirname(path), targetPlan.companion) : undefined;
    if (companionPath !== undefined) {
      if (targetPlan.placement !== 'identity') throw new Error(`${opts.to}: a companion file needs identity placement of the data`);
      if (await (opts.storage ?? fileStorage).exists(companionPath)) {
        // The target's parameter that names the companion is its option for it (VMDK flat: descriptor).
        const option = Object.entries(targetPlan.parameters).find(([, v]) => v === targetPlan.companion)?.[0];
        throw new UsageError(`${companionPath} exists; the conversion would create it (name another with ${option !== undefined ? `-o ${option}=NAME` : "the target's options"})`);
      }
    }
    if (sameFormat && targetPlan.parameters.subformat !== undefined && targetPlan.parameters.subformat === info.subformat) {
      throw new UsageError(`${path} is already ${opts.to} ${info.subformat}; nothing to do`);
    }
    const identity = targetPlan.placement === 'identity' ? await planIdentity(source, mapping, hostSpace, fileLength, targetPlan, opts.to, opts.relocationWindow ?? DEFAULT_WINDOW) : undefined;

    const reserved = [...targetPlan.fixedRegions, ...(targetPlan.reserved ?? [])]
      .map((r) => ({ start: r.start, length: r.length }))
      .sort((a, b) => a.start - b.start);
    const alloc = new GapAllocator(hostSpace.free(), reserved, Math.max(fileLength, hostSpace.usedEnd()));

    // Data the target cannot express where it lies is copied to new space; the source keeps reading
    // the original until the commit, so the copy needs no repointing of the source.
    // A source that can repoint its own data units (QED, VMDK sparse) moves them there in rounds
    // instead (relocate.ts, planMoveRelocation): each destination then also needs the source's unit
    // alignment (a QED cluster), the target's prefix (VHD's bitmap sector) fitting in front of it.
    const mustMove = identity ? [] : targetPlan.mustMove;
    const relocAlign = source.relocationAlignment ?? 512;
    const canRelocate =
      mustMove.length > 0 &&
      source.relocatable !== undefined &&
      source.dataDev === source.dev &&
      !mustMove.some((m) => [...mapping.range(m.guest, m.length)].some((e) => e.kind === 'compressed'));
    const moves: DataMove[] = [];
    const targets: MoveTarget[] = [];
    const zero: { start: number; length: number }[] = [];
    for (const m of mustMove) {
      if (info.backing && [...mapping.range(m.guest, m.length)].some((e) => e.kind === 'unallocated')) {
        throw new UnsupportedError(info.format, 'partly allocated cluster over a backing file', `guest ${m.guest}+${m.length} must move (${m.reason}) but part of it reads from the backing file`);
      }
      const prefix = targetPlan.movePrefix ?? 0;
      const room = Math.max(m.length, m.hostLength ?? 0);
      let to: number;
      if (canRelocate) {
        const pad = alignUp(prefix, relocAlign);
        const start = alloc.alloc(pad + room, Math.max(targetPlan.dataAlignment, relocAlign));
        to = start + pad;
        zero.push({ start: to, length: room });
      } else {
        to = alloc.alloc(prefix + room, targetPlan.dataAlignment) + prefix;
      }
      targets.push({ guest: m.guest, length: m.length, to, room });
      const first = [...mapping.range(m.guest, m.length)].find((e) => e.kind === 'data');
      moves.push({ guest: m.guest, length: m.length, ...(first ? { from: first.host! - (first.guest - m.guest) } : {}), to, reason: m.reason });
    }
    let moveRelocation: Prepared['moveRelocation'];
    if (canRelocate) {
      const dataRuns: { guest: number; length: number; host: number }[] = [];
      for (const m of mustMove) for (const e of mapping.range(m.guest, m.length)) if (e.kind === 'data') dataRuns.push({ guest: e.guest, length: e.length, host: e.host! });
      const units: Unit[] = [];
      for (const r of await source.relocatable!(0, 0)) if (r.guest !== undefined) units.push({ ...r, guest: r.guest });
      const r = planMoveRelocation(units, targets, dataRuns, relocAlign, opts.relocationWindow ?? DEFAULT_WINDOW);
      if (r) moveRelocation = { ...r, zero };
    }
    const movedMapping = identity ? identity.expected : overlayMoves(mapping, moves);
    const build = targetDriver.target.build(targetPlan, { ...input, mapping: movedMapping }, alloc);
    const dataMoveBytes = identity ? identity.relocation.movedBytes : moveRelocation ? moveRelocation.plan.movedBytes : moves.reduce((s, m) => s + m.length, 0);
    // Identity targets are the guest bytes (plus a footer): their length is exact, and reclaim cuts
    // the relocation's scratch space off once the result is verified.
    const finalLength = identity ? build.finalLength : Math.max(build.finalLength, fileLength);
    const commitBytes = identity ? identity.redo.reduce((s, r) => s + r.length, 0) + build.fixed.reduce((s, f) => s + f.bytes.length, 0) : 0;
    if (identity && companionPath === undefined) await refuseProbeTrap(path, dev, source, mapping, build, opts);
    if (2 * commitBytes > MAX_BINARY) {
      throw new UnsupportedError(info.format, 'metadata inside the disk', `${commitBytes} bytes of the source's tables lie where ${opts.to} puts guest data; the commit record would carry them twice, beyond the journal's ${MAX_BINARY}-byte limit`);
    }
    let compaction = { tablesBytes: 0, dataBytes: 0, finalLength };
    if (targetDriver.target.unreferencedIsLeak && !intermediate) {
      const cs = targetPlan.dataAlignment;
      const data: { start: number; length: number }[] = [];
      for (const e of movedMapping) if (e.kind === 'data') data.push({ start: e.host!, length: alignUp(e.length, cs) });
      compaction = estimateCompaction({
        cs,
        header: targetPlan.fixedRegions,
        tables: build.writes.map((w) => ({ start: w.offset, length: w.bytes.length })),
        data,
        fileLength: finalLength,
      });
    }
    // Compaction copies data in batches of whole clusters, at most the window (at least one cluster) each.
    const cs = targetPlan.dataAlignment;
    const window = opts.relocationWindow ?? DEFAULT_WINDOW;
    const compactionBatch = Math.min(compaction.dataBytes, Math.max(cs, window - (window % cs)));
    const plan: ConversionPlan = {
      image: path,
      source: { format: info.format, virtualSize: info.virtualSize, fileLength, ...(info.backing ? { backing: info.backing.filename } : {}) },
      target: { format: opts.to, parameters: targetPlan.parameters },
      metadataBytes: build.metadataBytes,
      moves,
      dataMoveBytes,
      compactionMoveBytes: compaction.tablesBytes + compaction.dataBytes,
      // Identity targets grow the file's length to the virtual size, sparsely; what costs disk space is
      // a round's second copies, or at the commit the record (new and old bytes) and the redo writes.
      // Moves relocated inside the source: a round's second copies, or later the new tables and the
      // commit record (the fixed regions' new and old bytes) and their writes in place.
      peakExtraBytes: identity
        ? identityPeakExtra(identity.relocation, commitBytes)
        : moveRelocation
          ? // After the commit a compacting target (QED) copies the relocated data back below its end in
            // batches of the window, each batch's old places punched before the next: one batch counts too.
            Math.max(moveRelocation.plan.largestRound, build.metadataBytes + 2 * build.fixed.reduce((s, f) => s + f.bytes.length, 0), compactionBatch) + compaction.tablesBytes / 2
          : Math.max(0, finalLength - fileLength) + compaction.tablesBytes / 2,
      ...(identity ? { relocation: { rounds: identity.relocation.rounds.length, scratchPeakBytes: identity.relocation.scratchPeak, commitBytes } } : {}),
      ...(moveRelocation ? { relocation: { rounds: moveRelocation.plan.rounds.length, scratchPeakBytes: 0, commitBytes: 0 } } : {}),
      ...(companionPath !== undefined ? { companion: companionPath } : {}),
      // After compaction (QED) the file is cut to what it holds.
      finalLength: compaction.finalLength,
      dropped: [
        ...(info.notCarried ?? []).filter((f) => f.action === 'drop').map((f) => f.feature),
        ...targetPlan.dropped,
        ...Object.entries(info.carried ?? {})
          .filter(([k]) => !(targetPlan.kept ?? []).includes(k as CarriedField))
          .map(([k, v]) => `${CARRIED_LABELS[k as CarriedField]} (${v})`),
      ],
    };
    return { chain, source, target: targetDriver.target, targetPlan, input, moves, movedMapping, writes: build.writes, fixed: build.fixed, finalLength, plan, undo: [], holesAsData: holesToData, ...(identity ? { identity } : {}), ...(moveRelocation ? { moveRelocation } : {}), ...(companionPath !== undefined ? { companion: { path: companionPath, bytes: build.companion ?? new Uint8Array() } } : {}) };
  } catch (e) {
    await chain.close();
    throw e;
  }
}

/**
 * An identity target's first and last bytes are the guest's. When they look like another format (the
 * guest disk holds an image, or a boot sector with a magic), the result would be taken for that format
 * by anything that probes it — and our own verification would roll it back after the commit. Checked
 * before any write instead: the result's head and tail (and the target's fixed regions) must probe and
 * open as the target.
 */
async function refuseProbeTrap(path: string, dev: BlockDevice, source: SourceImage, mapping: ExtentMap, build: TargetBuild, opts: ConvertOptions): Promise<void> {
  const V = mapping.virtualSize;
  const headLength = Math.min(V, 65536);
  const tailStart = Math.max(0, V - 512);
  const view = new OverlayDevice(
    dev,
    [
      { offset: 0, bytes: await readTopLayer(source, mapping, 0, headLength) },
      { offset: tailStart, bytes: await readTopLayer(source, mapping, tailStart, V - tailStart) },
      ...build.fixed,
    ],
    build.finalLength,
  );
  const probed = await probe(view, opts.drivers);
  let opens = probed.driver.name === opts.to;
  if (opens) {
    try {
      const chain = await openImage(path, { drivers: opts.drivers, format: opts.to, topDevice: view, backing: false });
      await chain.close();
    } catch (e) {
      if (!(e instanceof ImgconvError) || e instanceof IoError) throw e;
      opens = false;
    }
  }
  if (!opens) {
    throw new UnsupportedError(
      source.format,
      'guest data that looks like another format',
      `the disk's first or last bytes ${probed.driver.name !== opts.to ? `read as a ${probed.driver.name} image` : `stop a ${opts.to} reader (the guest's bytes come first in a ${opts.to} file)`}; converted in place to ${opts.to}, the file would be taken for something else by anything that probes it (imgconv, qemu-img). Convert to a format with its own header (qcow2, QED, VMDK, VHD dynamic) instead`,
    );
  }
}

/**
 * The source image as every route planned from one device sees it. The route chooser plans up to one
 * route per registered format, and each plan needs the same open source, mapping, host space, file holes
 * and backing file's info; reading them once per route scanned a 1 GiB qcow2 with 512-byte clusters' 32,768
 * L2 tables three times per route. Each plan takes a handle on the one open chain (`open`); the chain is
 * closed once every handle and the owner (`release`) have let go, so a route kept for running holds it
 * open after the others are closed. Reading only: the device is never written through it.
 */
class SourceAnalysis {
  private chain: Promise<ImageChain> | undefined;
  /** Handles on the chain, the owner's included. */
  private holders = 1;
  private readonly memo = new Map<string, Promise<unknown>>();

  constructor(
    private readonly path: string,
    private readonly dev: BlockDevice,
    private readonly opts: ConvertOptions,
  ) {}

  /** A handle on the open chain (opened on first use); its close() gives the handle back. */
  async open(): Promise<ImageChain> {
    const storage = this.opts.storage ?? fileStorage;
    // Related files (an external data file, a flat extent) are opened read-only through the same storage.
    this.chain ??= openImage(this.path, { drivers: this.opts.drivers, format: this.opts.format, topDevice: this.dev, backing: false, opener: (p, o) => storage.open(p, { ...o, write: false }) });
    const chain = await this.chain;
    this.holders++;
    let held = true;
    return {
      ...chain,
      close: async () => {
        if (!held) return;
        held = false;
        await this.release();
      },
    };
  }

  /** The owner lets go; the chain closes when no handle is left either. */
  async release(): Promise<void> {
    if (--this.holders > 0 || this.chain === undefined) return;
    const chain = await this.chain.catch(() => undefined);
    await chain?.close();
  }

  private once<T>(key: string, compute: () => Promise<T>): Promise<T> {
    let p = this.memo.get(key) as Promise<T> | undefined;
    if (!p) {
      p = compute();
      p.catch(() => undefined); // each caller awaits it and sees the error itself
      this.memo.set(key, p);
    }
    return p;
  }

  private async source(): Promise<SourceImage> {
    return (await this.chain!).layers[0]!;
  }

  mapping(): Promise<ExtentMap> {
    return this.once('mapping', async () => (await this.source()).mapping());
  }

  /** The mapping with zero runs over file holes as data in place (holes.ts). */
  mappingWithHoles(): Promise<ExtentMap> {
    return this.once('mappingWithHoles', async () => holesAsData(await this.mapping(), await scanHoles(this.dev)));
  }

  hostSpace(): Promise<HostSpace> {
    return this.once('hostSpace', async () => (await this.source()).hostSpace());
  }

  backingInfo(): Promise<ImageInfo | undefined> {
    return this.once('backingInfo', () => openBackingInfo(this.path, this.dev, this.opts));
  }
}

/**
 * The backing file's ImageInfo, read through the same storage (it is never written). Undefined when it
 * cannot be opened: a conversion that only copies the backing reference does not need it.
 */
async function openBackingInfo(path: string, dev: BlockDevice, opts: ConvertOptions): Promise<ImageInfo | undefined> {
  const storage = opts.storage ?? fileStorage;
  try {
    const chain = await openImage(path, { drivers: opts.drivers, format: opts.format, topDevice: dev, backing: true, opener: (p, o) => storage.open(p, { ...o, write: false }) });
    try {
      return chain.layers[1]?.info;
    } finally {
      await chain.close();
    }
  } catch (e) {
    if (e instanceof ImgconvError && !(e instanceof IoError && e.code !== 'ENOENT')) return undefined;
    throw e;
  }
}

/** Replaces the guest ranges of `moves` by data runs at their new place. */
export function overlayMoves(map: ExtentMap, moves: DataMove[]): ExtentMap {
  if (moves.length === 0) return map;
  const sorted = moves.slice().sort((a, b) => a.guest - b.guest);
  const out = new ExtentMap(map.virtualSize);
  let pos = 0;
  for (const m of sorted) {
    if (m.guest > pos) for (const e of map.range(pos, m.guest - pos)) out.push(stripWithin(e));
    out.push({ guest: m.guest, length: m.length, kind: 'data', host: m.to });
    pos = m.guest + m.length;
  }
  if (pos < map.virtualSize) for (const e of map.range(pos, map.virtualSize - pos)) out.push(stripWithin(e));
  return out;
}

function stripWithin(e: Extent & { within: number }): Extent {
  const { within: _w, ...rest } = e;
  void _w;
  return rest;
}

interface Route {
  prepared: Prepared;
  /** Second step, when the first converts to an intermediate format. */
  then?: { to: string; options: TargetOptions; estimate: ConversionPlan };
  /** The routes compared (two-step conversions): moved bytes through each intermediate, or why it cannot serve. */
  alternatives?: RouteAlternative[];
}

export interface RouteAlternative {
  /** The intermediate format, or 'direct' (one step). */
  via: string;
  movedBytes?: number;
  /** Most extra disk space the route takes at once (plan's peakExtraBytes). */
  peakExtraBytes?: number;
  refused?: string;
}

/**
 * How many more bytes a two-step route may move than the direct one and still be taken for its smaller
 * peak: one 64 KiB cluster per direct move (the intermediate's own header displaces about that much), or
 * 1 % of the direct route's moved bytes, whichever is more.
 */
export function routeMargin(direct: ConversionPlan): number {
  return Math.max(direct.moves.length * 65536, Math.floor((direct.dataMoveBytes + direct.compactionMoveBytes) / 100));
}

/**
 * The direct conversion, or — when the target needs data relocated and the source format cannot do
 * that (NeedsIntermediateError) — the cheapest route through another target format from the registry
 * that keeps the data where it is and can then be relocated: each candidate's first step is planned,
 * the second is planned on a view of the image as the first step leaves it, and the fewest moved bytes win.
 */
async function chooseRoute(path: string, dev: BlockDevice, opts: ConvertOptions): Promise<Route> {
  // Every route starts from the same source: opened and read once for all of them.
  const shared = new SourceAnalysis(path, dev, opts);
  try {
    return await chooseRouteOn(path, dev, opts, shared);
  } finally {
    await shared.release();
  }
}

async function chooseRouteOn(path: string, dev: BlockDevice, opts: ConvertOptions, shared: SourceAnalysis): Promise<Route> {
  let direct: Prepared;
  try {
    direct = await prepare(path, dev, opts, false, shared);
  } catch (e) {
    if (!(e instanceof NeedsIntermediateError)) throw e;
    const candidates: (Route & { cost: number; peak: number })[] = [];
    const tried: string[] = [];
    const alternatives: RouteAlternative[] = [];
    try {
      for (const d of opts.drivers) {
        // The target's own format with default options may serve (VMDK sparse on the way to VMDK flat).
        if (!d.target || d.name === e.format) continue;
        let first: Prepared | undefined;
        try {
          first = await prepare(path, dev, { ...opts, to: d.name, options: {} }, true, shared);
          const second = await planSecondStep(path, dev, first, d.name, opts);
          const cost = first.plan.dataMoveBytes + first.plan.compactionMoveBytes + second.plan.dataMoveBytes;
          const peak = combinePlans(first.plan, second.plan).peakExtraBytes;
          alternatives.push({ via: d.name, movedBytes: cost, peakExtraBytes: peak });
          candidates.push({ prepared: first, then: { to: opts.to, options: opts.options ?? {}, estimate: second.plan }, cost, peak });
          first = undefined;
        } catch (err) {
          // Only a refusal rules a route out; an I/O error stops the conversion (before any write).
          if (!(err instanceof ImgconvError) || err instanceof IoError) throw err;
          tried.push(`through ${d.name}: ${(err as Error).message}`);
          alternatives.push({ via: d.name, refused: (err as Error).message });
        } finally {
          if (first) await first.chain.close();
        }
      }
    } catch (err) {
      for (const c of candidates) await c.prepared.chain.close();
      throw err;
    }
    const best = pickIntermediate(candidates);
    if (!best) throw new UnsupportedError(e.format, e.feature, `${e.message}; no intermediate format works either (${tried.join('; ')})`);
    for (const c of candidates) if (c !== best) await c.prepared.chain.close();
    return { prepared: best.prepared, ...(best.then ? { then: best.then } : {}), alternatives };
  }
  // Moves the source cannot make by relocating its own data (raw, qcow2, VHD) are copies made before
  // the commit: the disk holds all of them at once. A route through an intermediate format that can
  // relocate (QED, VMDK sparse) bounds that by a round, and is taken when it moves no more than the
  // direct route plus a small margin (routeMargin) and takes less space at its peak. The fewest moved
  // bytes stay the first rule: past the margin the direct route is kept.
  // A direct route whose copies fit in one relocation window already keeps the bound: kept as it is.
  const window = opts.relocationWindow ?? DEFAULT_WINDOW;
  if (direct.moves.length === 0 || direct.moveRelocation !== undefined || direct.identity !== undefined || direct.plan.peakExtraBytes <= window) return { prepared: direct };
  const directCost = direct.plan.dataMoveBytes + direct.plan.compactionMoveBytes;
  const alternatives: RouteAlternative[] = [{ via: 'direct', movedBytes: directCost, peakExtraBytes: direct.plan.peakExtraBytes }];
  let best: Route | undefined;
  let bestPeak = direct.plan.peakExtraBytes;
  const limit = directCost + routeMargin(direct.plan);
  for (const d of opts.drivers) {
    if (!d.target || d.name === opts.to || d.name === direct.plan.source.format) continue;
    let first: Prepared | undefined;
    try {
      first = await prepare(path, dev, { ...opts, to: d.name, options: {} }, true, shared);
      const second = await planSecondStep(path, dev, first, d.name, opts);
      const cost = first.plan.dataMoveBytes + first.plan.compactionMoveBytes + second.plan.dataMoveBytes + second.plan.compactionMoveBytes;
      const peak = combinePlans(first.plan, second.plan).peakExtraBytes;
      alternatives.push({ via: d.name, movedBytes: cost, peakExtraBytes: peak });
      if (cost <= limit && peak < bestPeak) {
        if (best) await best.prepared.chain.close();
        best = { prepared: first, then: { to: opts.to, options: opts.options ?? {}, estimate: second.plan } };
        bestPeak = peak;
        first = undefined;
      }
    } catch (err) {
      if (!(err instanceof ImgconvError) || err instanceof IoError) {
        if (best) await best.prepared.chain.close();
        await direct.chain.close();
        throw err;
      }
      alternatives.push({ via: d.name, refused: (err as Error).message });
    } finally {
      if (first) await first.chain.close();
    }
  }
  if (!best) {
    direct.plan.alternatives = alternatives;
    return { prepared: direct };
  }
  await direct.chain.close();
  return { ...best, alternatives };
}

/**
 * Among routes through an intermediate (the only ways to convert), the fewest moved bytes first — but
 * a route that moves at most 1 % more (and at least 1 MiB more) and takes less space at its peak wins:
 * VHD dynamic → raw through QED copies every cluster before its commit (a second copy of the disk at
 * the peak) while the route through VMDK moves 0.3 % more in rounds of one relocation window. A peak
 * lower by under 1 MiB does not count; ties keep the registry's order.
 */
export function pickIntermediate<T extends { cost: number; peak: number }>(candidates: readonly T[]): T | undefined {
  if (candidates.length === 0) return undefined;
  const cheapest = candidates.reduce((a, c) => (c.cost < a.cost ? c : a));
  const limit = cheapest.cost + Math.max(Math.floor(cheapest.cost / 100), 1 << 20);
  const lowest = candidates.filter((c) => c.cost <= limit).reduce((a, c) => (c.peak < a.peak ? c : a));
  // A peak lower by less than 1 MiB is noise in the estimate: the fewest moved bytes stay.
  return lowest.peak < cheapest.peak - (1 << 20) ? lowest : cheapest;
}

/** The second step of a route through `via`, planned on a view of the image as `first` leaves it (reading only). */
async function planSecondStep(path: string, dev: BlockDevice, first: Prepared, via: string, opts: ConvertOptions): Promise<Prepared> {
  const view = new OverlayDevice(dev, [...first.writes, ...first.fixed], first.finalLength);
  const second = await prepare(path, view, { ...opts, format: via });
  await second.chain.close();
  return second;
}

/**
 * The conversion of the image on `dev` (a view of it as an earlier step leaves it) as the route chooser
 * takes it — direct, or through an intermediate — reading only. continueStages runs the same choice.
 */
export async function planRoute(path: string, dev: BlockDevice, opts: ConvertOptions): Promise<ConversionPlan> {
  const route = await chooseRoute(path, dev, opts);
  await route.prepared.chain.close();
  return planOf(route);
}

/** A chosen route's plan: one step's, or both steps' seen whole with the routes compared. */
function planOf(route: Route): ConversionPlan {
  return route.then ? { ...combinePlans(route.prepared.plan, route.then.estimate), ...(route.alternatives ? { alternatives: route.alternatives } : {}) } : route.prepared.plan;
}

/** A two-step conversion seen whole: from the original source to the final target, bytes summed. */
export function combinePlans(a: ConversionPlan, b: ConversionPlan): ConversionPlan {
  return {
    ...b,
    ...(a.adoption ? { adoption: a.adoption } : {}),
    image: a.image,
    source: a.source,
    metadataBytes: a.metadataBytes + b.metadataBytes,
    moves: a.moves,
    dataMoveBytes: a.dataMoveBytes + b.dataMoveBytes,
    compactionMoveBytes: a.compactionMoveBytes + b.compactionMoveBytes,
    peakExtraBytes: Math.max(a.peakExtraBytes, b.peakExtraBytes + Math.max(0, a.finalLength - a.source.fileLength)),
    dropped: [...new Set([...a.dropped, ...b.dropped])],
    steps: [a, b],
  };
}

export function combineReports(a: ConversionReport, b: ConversionReport): ConversionReport {
  const { steps: _s, ...plan } = combinePlans({ ...a, steps: undefined }, { ...b, steps: undefined });
  void _s;
  return {
    ...plan,
    written: {
      metadataBytes: a.written.metadataBytes + b.written.metadataBytes,
      dataBytes: a.written.dataBytes + b.written.dataBytes,
      compactionBytes: a.written.compactionBytes + b.written.compactionBytes,
    },
    reclaimedBytes: a.reclaimedBytes + b.reclaimedBytes,
    verified: b.verified,
    steps: [a, b],
  };
}

/** `imgconv plan`: everything `inplace` would do, without writing. */
export async function planConversion(path: string, opts: ConvertOptions): Promise<ConversionPlan> {
  const storage = opts.storage ?? fileStorage;
  await refuseInterrupted(path, storage);
  const dev = await storage.open(path, { write: false });
  try {
    let route: Route;
    try {
      route = await chooseRoute(path, dev, opts);
    } catch (e) {
      if (e instanceof AdoptDataFile) return await planAdoptionOf(path, dev, opts, e.then);
      throw e;
    }
    await route.prepared.chain.close();
    return planOf(route);
  } finally {
    await dev.close();
  }
}

async function refuseInterrupted(path: string, storage: Storage): Promise<void> {
  if (await storage.exists(journalPath(path))) {
    throw new InterruptedConversionError(
      `${path} has an interrupted conversion (${journalPath(path)} exists); run: imgconv recover ${path}`,
    );
  }
}

export class InterruptedConversionError extends ImgconvError {}

/** Says in which state a failed conversion left the image. */
export class ConversionFailedError extends ImgconvError {
  constructor(
    /** intermediate: a two-step conversion stopped between its steps; the image is valid in the intermediate format. */
    readonly imageState: 'untouched' | 'rolled-back' | 'converted' | 'needs-recover' | 'intermediate',
    message: string,
    readonly causeError?: unknown,
  ) {
    super(message);
  }
}

/** Reads the current bytes of each fixed region (zeros past EOF). */
async function readRegions(dev: BlockDevice, regions: { offset: number; length: number }[]): Promise<Region[]> {
  const out: Region[] = [];
  for (const r of regions) {
    const bytes = new Uint8Array(r.length);
    let done = 0;
    while (done < r.length) {
      const n = await dev.read(bytes.subarray(done), r.offset + done);
      if (n === 0) break;
      done += n;
    }
    out.push({ offset: r.offset, bytes });
  }
  return out;
}

/** Guest bytes of `ranges` (identity: host = guest) as the source reads them now. */
async function readGuestRanges(path: string, dev: BlockDevice, drivers: readonly FormatDriver[], format: string, ranges: { start: number; length: number }[]): Promise<Region[]> {
  if (ranges.length === 0) return [];
  const chain = await openImage(path, { drivers, format, topDevice: dev, backing: false });
  try {
    const img = chain.layers[0]!;
    const map = await img.mapping();
    const out: Region[] = [];
    for (const r of ranges) out.push({ offset: r.start, bytes: await readTopLayer(img, map, r.start, r.length) });
    return out;
  } finally {
    await chain.close();
  }
}

const COPY_CHUNK = 4 << 20;
/** The longest run the pre-commit copies read at once (the copier holds two buffers of it). */
const MOVE_RUN = 8 << 20;

/**
 * The pre-commit copies of a source that cannot repoint its data (step 3): each move's guest range into
 * its destination. Data runs are copied device to device through a FreeSpaceCopier (src/blockdev/copy.ts,
 * as relocation's rounds: reused read-ahead buffers, zero blocks punched, length tracked, writeback
 * hint); parts that read zeros are punched (free space may hold stale bytes); compressed parts are
 * decoded and written like before. The crash argument is unchanged: every destination is free space no
 * live structure references, every source a live data run the source keeps reading (no source pointer
 * changes before the commit), so no copy overwrites anything a reader needs and their order is free;
 * the caller flushes before any metadata refers to the copies. The file ends up at least as long as
 * the last move's end (a format may require a structure wholly inside the file).
 */
async function copyMoves(dev: BlockDevice, source: SourceImage, mapping: ExtentMap, moves: readonly DataMove[], onBytes: (n: number) => void, signal?: AbortSignal): Promise<void> {
  if (moves.length === 0) return;
  if (source.dataDev !== dev) throw new Error(`${source.format}: moves copy inside the image, but its data lives in another file`);
  const runs: CopyRun[] = [];
  const zeros: { to: number; length: number }[] = [];
  const compressed: { guest: number; to: number; length: number }[] = [];
  // Progress is reported per run written: runs of at most 1/64 of the bytes moved (≥ 64 KiB) keep a small
  // move's progress moving too — gathered 8 MiB runs made a 25 MiB move report three times.
  const runMax = Math.min(MOVE_RUN, Math.max(64 << 10, alignUp(Math.ceil(moves.reduce((n, m) => n + m.length, 0) / 64), 64 << 10)));
  let end = 0;
  for (const m of moves) {
    end = Math.max(end, m.to + m.length);
    for (const e of mapping.range(m.guest, m.length)) {
      const to = m.to + (e.guest - m.guest);
      if (e.kind === 'data') {
        for (let off = 0; off < e.length; off += runMax) runs.push({ from: e.host! + off, to: to + off, length: Math.min(runMax, e.length - off) });
      } else if (e.kind === 'compressed') compressed.push({ guest: e.guest, to, length: e.length });
      else zeros.push({ to, length: e.length });
    }
  }
  // Runs whose destinations continue each other as one buffer and one write (a qcow2 with 512-byte
  // clusters: 32 KiB pieces between its tables, one destination), sources continuing as one read.
  const gathered = gatherRuns(runs, runMax);
  const copier = await FreeSpaceCopier.open(dev, gathered.reduce((n, r) => Math.max(n, r.length), 0));
  for (const z of zeros) {
    signal?.throwIfAborted();
    await copier.punch(z.to, z.length);
    onBytes(z.length);
  }
  await copier.copy(gathered, onBytes, signal);
  for (const c of compressed) {
    for (let off = 0; off < c.length; off += COPY_CHUNK) {
      signal?.throwIfAborted();
      const len = Math.min(COPY_CHUNK, c.length - off);
      const bytes = await readTopLayer(source, mapping, c.guest + off, len);
      await writeIntoFree(dev, c.to + off, bytes);
      copier.wrote(c.to + off, len);
      onBytes(len);
    }
  }
  if (copier.size < end) await dev.truncate(end);
}

export async function convertInPlace(path: string, opts: ConvertOptions): Promise<ConversionReport> {
  const storage = opts.storage ?? fileStorage;
  const progress = (phase: Phase, bytesDone: number, bytesTotal: number) => opts.onProgress?.({ phase, bytesDone, bytesTotal });
  await refuseInterrupted(path, storage);
  // An I/O error before the first write leaves the file byte-identical; say so like any other failure
  // (refusals — unsupported, corrupt, bad usage, a missing file — keep their own error).
  const untouched = (e: unknown) =>
    e instanceof IoError && e.code !== 'ENOENT' ? new ConversionFailedError('untouched', `conversion failed before anything was written: ${e.message}; ${path} is unchanged`, e) : e;
  // 1. Lock (exclusive OFD lock; refused while QEMU holds the image) and analyse, read-only.
  let dev: BlockDevice;
  try {
    dev = await storage.open(path, { write: true, lock: true });
  } catch (e) {
    throw untouched(e);
  }
  let route: Route;
  try {
    progress('analyse', 0, 1);
    route = await chooseRoute(path, dev, opts);
    progress('plan', 1, 1);
  } catch (e) {
    // An image whose data lives in another file → raw: that file becomes the image (no journal).
    if (e instanceof AdoptDataFile) return adoptDataFile(path, dev, opts, e.then);
    await dev.close();
    throw untouched(e); // nothing was written: the file is byte-identical
  }
  const journal: JournalHandle = { dev: undefined, end: 0 };
  const first = await runStage(path, dev, storage, route.prepared, opts, journal, route.then);
  if (!route.then) return first;
  return continueStages(path, dev, storage, opts, journal, first, route.prepared.plan.target.format);
}

/** The journal file of a conversion, shared by its steps. */
export interface JournalHandle {
  dev: BlockDevice | undefined;
  end: number;
}

/**
 * The second step of a two-step conversion, on the intermediate image the first step left, appending
 * to the same journal (recovery finishes it from there). If it is refused now, the image is a valid
 * image of the intermediate format with the same guest content, and the error says so.
 */
export async function continueStages(
  path: string,
  dev: BlockDevice,
  storage: Storage,
  opts: ConvertOptions,
  journal: JournalHandle,
  first: ConversionReport | undefined,
  via: string,
): Promise<ConversionReport> {
  let route: Route;
  opts = { ...opts, format: via };
  try {
    // The route chooser, as for any source on this device: raw (an adopted data file) → VHD dynamic
    // takes the bounded route through VMDK here too, a third step after the adoption.
    route = await chooseRoute(path, dev, opts);
  } catch (e) {
    await journal.dev?.close().catch(() => {});
    await dev.close().catch(() => {});
    if (!(e instanceof ImgconvError) || e instanceof IoError) {
      // The journal stays: recover runs the second step again once the I/O works.
      throw new ConversionFailedError('needs-recover', `${path} is a valid ${via} image with the same guest content (the first of two steps is done); the step to ${opts.to} failed: ${(e as Error).message}; finish it with: imgconv recover ${path}`, e);
    }
    await storage.remove(journalPath(path)).then(() => storage.syncDir(journalPath(path))).catch(() => {});
    throw new ConversionFailedError('intermediate', `${path} is now a valid ${via} image with the same guest content (the first of two steps); the step to ${opts.to} failed: ${(e as Error).message}`, e);
  }
  const report = await runStage(path, dev, storage, route.prepared, opts, journal, route.then, via);
  // Through an intermediate: its step is done (image and journal still held), the last step follows.
  const whole = route.then ? await continueStages(path, dev, storage, opts, journal, report, route.prepared.plan.target.format) : report;
  return first ? combineReports(first, whole) : whole;
}

/**
 * One conversion step: the commit protocol. `then`: a second step follows (the journal stays open, the
 * image locked); `intermediateOf`: this is that second step, whose source is the intermediate format.
 */
async function runStage(
  path: string,
  dev: BlockDevice,
  storage: Storage,
  prepared: Prepared,
  stageOpts: ConvertOptions,
  jh: JournalHandle,
  then?: Route['then'],
  intermediateOf?: string,
): Promise<ConversionReport> {
  const opts = { ...stageOpts, to: prepared.plan.target.format };
  const progress = (phase: Phase, bytesDone: number, bytesTotal: number) => opts.onProgress?.({ phase, bytesDone, bytesTotal });
  const { plan, moves, writes, source, identity, moveRelocation } = prepared;
  /** Data is relocated inside the source before the commit (identity targets, or moves of a relocatable source). */
  const relocating = identity !== undefined || moveRelocation !== undefined;
  let fixed = prepared.fixed;
  const jpath = journalPath(path);
  let journal: BlockDevice | undefined = jh.dev;
  const appendRecord = async (bytes: Uint8Array) => {
    await journal!.write(bytes, jh.end);
    jh.end += bytes.length;
    await journal!.flush();
  };
  let committed = false;
  /** The COMMIT record was written but neither its flush nor taking it back succeeded. */
  let commitUncertain = false;
  let commitUndoLength: number | undefined;
  /** Set before the first write below the original length: until then a rollback leaves the file byte-identical. */
  let wroteInside = false;
  const inside = (offset: number) => {
    if (offset < plan.source.fileLength) wroteInside = true;
  };
  try {
    opts.signal?.throwIfAborted();
    // 2. Journal: the old bytes of every fixed region, and the original length. Durable before any
    //    write to the image, so any later crash can be rolled back. (A relocating conversion changes
    //    the source's own tables first, so its undo bytes are read just before the commit instead.)
    const undo = relocating ? [] : await readRegions(dev, fixed.map((f) => ({ offset: f.offset, length: f.bytes.length })));
    prepared.undo = undo;
    if (!journal) {
      journal = jh.dev = await storage.create(jpath);
      jh.end = 0;
    }
    await appendRecord(
      encodeRecord({
        type: 'prepare',
        sourceFormat: plan.source.format,
        targetFormat: plan.target.format,
        originalLength: plan.source.fileLength,
        sourceDigest: regionsDigest(undo),
        undo,
        plan: {
          virtualSize: plan.source.virtualSize,
          backing: plan.source.backing ?? null,
          // [guest, length, to] per move: recovery rebuilds the expected mapping from them (compact, since
          // a moving conversion of a large disk has a million of them).
          moves: moves.map((m) => [m.guest, m.length, m.to]),
          metadataBytes: plan.metadataBytes,
          dataMoveBytes: plan.dataMoveBytes,
          finalLength: plan.finalLength,
          ...(prepared.holesAsData ? {} : { holesAsData: false }),
          ...(identity ? { identity: true } : {}),
          // Recovery reclaims, compacts and runs a second step in rounds of the same window (a user
          // short of space picked it); informational, so not a journal feature (journal.ts).
          ...(opts.relocationWindow !== undefined ? { relocationWindow: opts.relocationWindow } : {}),
        },
        ...(relocating ? { relocating: true } : {}),
        ...(then ? { then: { to: then.to, options: then.options } } : {}),
      }),
    );
    await storage.syncDir(jpath);

    // 3a. Identity targets: relocate the source's data to host = guest, each round leaving a valid
    //     source image; then the guest bytes of what the source's own structures occupy become part of
    //     the commit, and the rest of the disk's range that reads zeros is punched (it is free now).
    let commitUndo: { undo: Region[]; undoLength: number } | undefined;
    if (identity) {
      progress('move', 0, plan.dataMoveBytes);
      wroteInside = true;
      await executeRelocation(dev, identity.units, identity.relocation, (done) => progress('move', done, plan.dataMoveBytes), opts.signal);
      const redo = await readGuestRanges(path, dev, opts.drivers, plan.source.format, identity.redo);
      for (const r of identity.punch) await dev.punchHole(r.start, r.length);
      await dev.flush();
      fixed = [...redo, ...fixed];
      const undoLength = await dev.size();
      commitUndo = { undo: await readRegions(dev, fixed.map((f) => ({ offset: f.offset, length: f.bytes.length }))), undoLength };
      prepared.undo = commitUndo.undo;
      commitUndoLength = undoLength;
    }

    // 3b. Moves of a relocatable source: its data units go to their destinations in rounds (copy →
    //     flush → repoint → flush → punch the old places), so the disk holds at most a round of second
    //     copies. The destinations are punched first: where a moved range reads zeros (no unit), the
    //     free space it lands in may hold stale bytes. The fixed regions' old bytes are read after that
    //     (a sector the relocation punched is what a rollback restores), like an identity target's.
    if (moveRelocation) {
      progress('move', 0, plan.dataMoveBytes);
      wroteInside = true;
      const size = await dev.size();
      for (const z of moveRelocation.zero) if (z.start < size) await dev.punchHole(z.start, Math.min(z.length, size - z.start));
      await dev.flush();
      await executeRelocation(dev, moveRelocation.units, moveRelocation.plan, (done) => progress('move', done, plan.dataMoveBytes), opts.signal);
      const undoLength = await dev.size();
      commitUndo = { undo: await readRegions(dev, fixed.map((f) => ({ offset: f.offset, length: f.bytes.length }))), undoLength };
      prepared.undo = commitUndo.undo;
      commitUndoLength = undoLength;
    }

    // 3. Data the target cannot express in place is copied to new space, then flushed, before any
    //    metadata refers to it. The source still reads the originals.
    if (!moveRelocation) {
      let moved = 0;
      progress('move', 0, plan.dataMoveBytes);
      for (const m of moves) inside(m.to);
      // Free space may hold stale bytes; the copies keep the source's zeros as holes.
      await copyMoves(dev, source, prepared.input.mapping, moves, (n) => progress('move', (moved += n), plan.dataMoveBytes), opts.signal);
      if (moves.length) await dev.flush();
    }

    // 4. New metadata into space no live source structure uses; flushed. The source is still intact.
    const writeTotal = writes.reduce((s, w) => s + w.bytes.length, 0);
    let written = 0;
    progress('write', 0, writeTotal);
    for (const w of writes) {
      opts.signal?.throwIfAborted();
      inside(w.offset);
      await dev.write(w.bytes, w.offset);
      written += w.bytes.length;
      progress('write', written, writeTotal);
    }
    await dev.flush();
    // The new tables are on disk and nothing reads their bytes again (a rollback restores from the
    // journal's undo bytes): let them go before verify and reclaim read the image (130–160 MiB at 1 TiB).
    writes.length = 0;
    opts.signal?.throwIfAborted();

    // 5. THE COMMIT POINT: once this record is durable, recovery rolls forward.
    progress('commit', 0, 1);
    const companion = prepared.companion;
    const beforeCommit = jh.end;
    try {
      await appendRecord(
        encodeRecord({
          type: 'commit',
          redo: fixed,
          finalLength: prepared.finalLength,
          ...(commitUndo ?? {}),
          ...(companion ? { companion: { path: companion.path, data: Buffer.from(companion.bytes).toString('base64') } } : {}),
        }),
      );
    } catch (e) {
      // The record may or may not have reached the disk. Take it back (durably) before anything is
      // undone; if even that fails, touch nothing more: recover decides from what the journal holds.
      try {
        await journal!.truncate(beforeCommit);
        await journal!.flush();
        jh.end = beforeCommit;
      } catch {
        commitUncertain = true;
      }
      throw e;
    }
    committed = true;
    await applyRedo(dev, fixed, prepared.finalLength);
    if (companion) await writeCompanion(storage, companion.path, companion.bytes);
    progress('commit', 1, 1);
  } catch (e) {
    await prepared.chain.close();
    // Did anything reach the bytes of the original file? (Writes past its end are truncated away.)
    const touched = wroteInside || intermediateOf !== undefined;
    if (commitUncertain) {
      await dev.close().catch(() => {});
      await journal?.close().catch(() => {});
      throw new ConversionFailedError('needs-recover', `conversion failed at its commit point (${(e as Error).message}); the image is a valid ${plan.source.format} image or, once committed, a ${plan.target.format} one — finish it with: imgconv recover ${path}`, e);
    }
    if (!committed && relocating && journal && isImageFlushFailure(e, dev.path)) {
      // The rollback of a relocating conversion reclaims: it reads the source's pointers and punches what
      // they no longer reference. After a failed fsync the page cache may hold pointer writes the disk
      // never got (Linux keeps the new bytes in cache and marks them clean), so a punch could free the
      // only durable copy a pointer on disk still names. Change nothing more now; recover reads the disk.
      await dev.close().catch(() => {});
      await journal.close().catch(() => {});
      throw new ConversionFailedError(
        'needs-recover',
        `conversion failed before the commit point: a flush of the image failed (${(e as Error).message}); what the disk holds may differ from what was written, so nothing more was changed. Once the disk is healthy (after a remount or reboot), run: imgconv recover ${path} — it rolls back to the valid ${plan.source.format} image the disk holds`,
        e,
      );
    }
    if (!committed) {
      // Before the commit: undo what was written (only free space and the tail) and drop the journal.
      try {
        if (journal) {
          // A relocating conversion leaves a valid source whose data may now lie past the original end:
          // it is not truncated; reclaim tidies the space the moves left (QED counts it as leaked).
          if (relocating) await reclaim(path, dev, opts.drivers, plan.source.format, undefined, undefined, true, undefined, false, opts.relocationWindow);
          else await dev.truncate(plan.source.fileLength);
          await dev.flush();
          await journal.close();
          journal = jh.dev = undefined;
          // The second step of two keeps the journal: the image is a valid intermediate, and recover
          // runs the second step again to reach the target the user asked for.
          if (intermediateOf === undefined) {
            await storage.remove(jpath);
            await storage.syncDir(jpath);
          }
        }
        await dev.close();
      } catch (rollbackError) {
        await dev.close().catch(() => {});
        await journal?.close().catch(() => {});
        throw new ConversionFailedError(
          'needs-recover',
          `conversion failed (${(e as Error).message}) and so did the clean-up (${(rollbackError as Error).message}); the image is still a valid ${plan.source.format} image or is made one by: imgconv recover ${path}`,
          e,
        );
      }
      if (intermediateOf !== undefined) {
        throw new ConversionFailedError(
          'needs-recover',
          `${isAbort(e) ? 'cancelled' : `failed (${(e as Error).message})`} before the commit point of the second step; ${path} is a valid ${intermediateOf} image with the same guest content (the first of two steps is done); finish the conversion to ${opts.to} with: imgconv recover ${path}`,
          e,
        );
      }
      // Untouched only if nothing was written yet; after the PREPARE record, the rollback restored the
      // source (relocation leaves its data where the last round put it, the guest content the same).
      const state = touched ? 'rolled-back' : 'untouched';
      const what = relocating && touched ? `is a valid ${plan.source.format} image with the same guest content (part of its data was relocated)` : `is unchanged (${plan.source.format})`;
      if (isAbort(e)) throw new ConversionFailedError(state, `cancelled before the commit point; ${path} ${what}`, e);
      throw new ConversionFailedError(journal === undefined && !(await storage.exists(jpath)) ? 'rolled-back' : 'needs-recover', `conversion failed before the commit point: ${(e as Error).message}; ${path} ${what}`, e);
    }
    await dev.close().catch(() => {});
    await journal?.close().catch(() => {});
    throw new ConversionFailedError('needs-recover', `conversion failed after the commit point: ${(e as Error).message}; finish it with: imgconv recover ${path}`, e);
  }
  await prepared.chain.close();

  // 6. Verify, then reclaim (shared with recovery).
  try {
    const { verified, reclaimedBytes, compactMovedBytes } = await finishCommitted({
      path,
      dev,
      storage,
      drivers: opts.drivers,
      to: opts.to,
      expected: prepared.movedMapping,
      virtualSize: plan.source.virtualSize,
      backing: plan.source.backing,
      append: appendRecord,
      undo: prepared.undo,
      originalLength: commitUndoLength ?? plan.source.fileLength,
      finalLength: prepared.finalLength,
      identity: identity !== undefined,
      intermediate: then !== undefined,
      redo: fixed,
      ...(prepared.companion ? { companion: prepared.companion.path } : {}),
      ...(relocating && intermediateOf === undefined ? { reclaimSourceAs: plan.source.format } : {}),
      ...(intermediateOf !== undefined ? { secondStepFrom: intermediateOf } : {}),
      ...(opts.relocationWindow !== undefined ? { window: opts.relocationWindow } : {}),
      onProgress: opts.onProgress,
    });
    const finalLength = await dev.size();
    if (!then) {
      await journal!.close();
      jh.dev = undefined;
      await storage.remove(jpath);
      await storage.syncDir(jpath);
      await dev.close();
    }
    return {
      ...plan,
      steps: undefined,
      finalLength,
      written: { metadataBytes: plan.metadataBytes, dataBytes: plan.dataMoveBytes, compactionBytes: compactMovedBytes },
      reclaimedBytes,
      verified,
    };
  } catch (e) {
    await dev.close().catch(() => {});
    await journal?.close().catch(() => {});
    if (e instanceof ConversionFailedError) {
      if (e.imageState === 'rolled-back') await storage.remove(jpath).then(() => storage.syncDir(jpath)).catch(() => {});
      throw e;
    }
    throw new ConversionFailedError('needs-recover', `conversion committed but not finished (${(e as Error).message}); finish it with: imgconv recover ${path}`, e);
  }
}

export interface FinishArgs {
  path: string;
  dev: BlockDevice;
  storage: Storage;
  drivers: readonly FormatDriver[];
  to: string;
  /** What the converted image must read: the source mapping with the moves applied. */
  expected: ExtentMap;
  virtualSize: number;
  backing: string | undefined;
  append: (record: Uint8Array) => Promise<void>;
  undo: Region[];
  /** The length a rollback restores (relocating conversions: the length just before the commit). */
  originalLength: number;
  /** The committed length: reclaim cuts the file to it (identity targets), verification reads no further. */
  finalLength: number;
  /** Identity target (raw, VHD fixed): verified as guest bytes at their own offsets. */
  identity: boolean;
  /**
   * The first step of a two-step conversion: its result is transient, so reclaim does not compact it
   * (the second step was planned on its layout as it stands; compacting would change it).
   */
  intermediate?: boolean;
  /** The bytes the commit wrote in place: an identity target punches their all-zero blocks (it is sparse where the guest reads zeros). */
  redo?: Region[];
  /** The companion file the commit created (VMDK flat descriptor): verified as the image; removed on rollback. */
  companion?: string;
  /**
   * A one-step relocating conversion (identity target): the source format, reclaimed after a rollback.
   * The relocation moved the source's data before the commit, so the rolled-back source references it
   * where it now lies and the places it left are unreferenced (QED counts them as leaks).
   */
  reclaimSourceAs?: string;
  /**
   * The second step of two: its source is this intermediate format. The first step's source is gone
   * (reclaimed), so a failed verification rolls back to the intermediate image and keeps the journal:
   * recover runs the second step again.
   */
  secondStepFrom?: string;
  /** Compaction's batch size (the conversion's relocation window; DEFAULT_WINDOW when not given). */
  window?: number;
  onProgress?: (e: ProgressEvent) => void;
}

/**
 * After the commit: verify the new image; if our own reader rejects it, roll back from the undo bytes
 * (the source's structures are all still in place until reclaim). Once verified, a DONE record is made
 * durable before reclaim starts, because reclaim destroys the source's tables and with them the way back.
 */
export async function finishCommitted(a: FinishArgs): Promise<{ verified: string[]; reclaimedBytes: number; compactMovedBytes: number }> {
  a.onProgress?.({ phase: 'verify', bytesDone: 0, bytesTotal: 1 });
  let verified: string[];
  try {
    if (a.companion) {
      // The image is the companion's data now: open the companion, which reads the image through storage.
      const cdev = await a.storage.open(a.companion, { write: false });
      try {
        verified = await verifyTarget(a.companion, cdev, a.drivers, a.to, a.expected, a.virtualSize, a.backing, true, (p, o) => a.storage.open(p, o));
      } finally {
        await cdev.close();
      }
    } else {
      // An identity target is its length: verify it as it will be once reclaim cuts the scratch space off.
      const view = a.identity ? new OverlayDevice(a.dev, [], a.finalLength) : a.dev;
      verified = await verifyTarget(a.path, view, a.drivers, a.to, a.expected, a.virtualSize, a.backing, a.identity);
    }
  } catch (e) {
    if (!(e instanceof VerificationError)) throw e;
    await a.append(encodeRecord({ type: 'abort', reason: e.message }));
    await rollBack(a.dev, a.undo, a.originalLength);
    if (a.companion && (await a.storage.exists(a.companion))) {
      await a.storage.remove(a.companion);
      await a.storage.syncDir(a.companion);
    }
    if (a.secondStepFrom !== undefined) {
      await a.dev.flush();
      throw new ConversionFailedError(
        'needs-recover',
        `the converted image failed verification (${e.message}); ${a.path} is a valid ${a.secondStepFrom} image with the same guest content (the first of two steps is done); run the second step again with: imgconv recover ${a.path}`,
        e,
      );
    }
    if (a.reclaimSourceAs !== undefined) await reclaimAfterRollback(a.storage, a.path, a.dev, a.drivers, a.reclaimSourceAs, a.window);
    throw new ConversionFailedError('rolled-back', `the converted image failed verification (${e.message}); ${a.path} was restored to its original format`, e);
  }
  a.onProgress?.({ phase: 'verify', bytesDone: 1, bytesTotal: 1 });
  await a.append(encodeRecord({ type: 'done' }));
  a.onProgress?.({ phase: 'reclaim', bytesDone: 0, bytesTotal: 1 });
  const { reclaimedBytes, compactMovedBytes } = await reclaim(
    a.path,
    a.dev,
    a.drivers,
    a.to,
    (done, total) => a.onProgress?.({ phase: 'reclaim', bytesDone: done, bytesTotal: total }),
    a.identity ? a.finalLength : undefined,
    !a.intermediate,
    a.identity ? a.redo : undefined,
    a.companion !== undefined,
    a.window,
  );
  a.onProgress?.({ phase: 'reclaim', bytesDone: 1, bytesTotal: 1 });
  return { verified, reclaimedBytes, compactMovedBytes };
}

/**
 * After a relocating conversion was rolled back from its commit: the file is a valid source image again
 * (its data where the relocation left it). The journal goes first — compaction rewrites the header whose
 * old bytes the journal's undo holds, so recovery could no longer tell its own changes from a stranger's —
 * then reclaim tidies the space the moves left. A crash during that reclaim leaves a valid source image
 * whose only defect can be unreferenced space (leaks), as any interrupted compaction does.
 */
export async function reclaimAfterRollback(storage: Storage, path: string, dev: BlockDevice, drivers: readonly FormatDriver[], sourceFormat: string, window?: number): Promise<void> {
  await dev.flush();
  await storage.remove(journalPath(path));
  await storage.syncDir(journalPath(path));
  await reclaim(path, dev, drivers, sourceFormat, undefined, undefined, true, undefined, false, window);
}

/** An fsync (fdatasync) of the image itself failed: its durable contents are no longer known. */
function isImageFlushFailure(e: unknown, imagePath: string): boolean {
  return e instanceof IoError && (e.op === 'fdatasync' || e.op === 'flush') && e.path === imagePath;
}

function isAbort(e: unknown): boolean {
  return e instanceof Error && (e.name === 'AbortError' || (e as { code?: string }).code === 'ABORT_ERR');
}

/** Creates (or re-creates) the companion file with its bytes, durably. Idempotent: recovery repeats it. */
export async function writeCompanion(storage: Storage, path: string, bytes: Uint8Array): Promise<void> {
  if (await storage.exists(path)) await storage.remove(path);
  const d = await storage.create(path);
  try {
    await d.write(bytes, 0);
    await d.flush();
  } finally {
    await d.close();
  }
  await storage.syncDir(path);
}

/** Writes the fixed regions and sets the committed length. Idempotent: recovery repeats it. */
export async function applyRedo(dev: BlockDevice, redo: Region[], finalLength: number): Promise<void> {
  for (const r of redo) await dev.write(r.bytes, r.offset);
  if (finalLength >= 0 && (await dev.size()) < finalLength) await dev.truncate(finalLength);
  await dev.flush();
}

/** Restores the fixed regions' old bytes and the original length. Idempotent. */
export async function rollBack(dev: BlockDevice, undo: Region[], originalLength: number): Promise<void> {
  for (const r of undo) await dev.write(r.bytes, r.offset);
  await dev.truncate(originalLength);
  await dev.flush();
}

export class VerificationError extends ImgconvError {}

/**
 * The new image must probe as the target, keep the virtual size, read the same guest content (same
 * data at the same host offsets; zeros where there were zeros; backing where there was backing) and
 * pass our structural check without corruption.
 */
export async function verifyTarget(
  path: string,
  dev: BlockDevice,
  drivers: readonly FormatDriver[],
  to: string,
  expected: ExtentMap,
  virtualSize: number,
  backing: string | undefined,
  identity = false,
  opener?: DeviceOpener,
): Promise<string[]> {
  const probed = await probe(dev, drivers);
  if (probed.driver.name !== to) throw new VerificationError(`the file probes as ${probed.driver.name}, not ${to}`);
  let chain: ImageChain;
  try {
    chain = await openImage(path, { drivers, format: to, topDevice: dev, backing: false, ...(opener ? { opener } : {}) });
  } catch (e) {
    if (e instanceof ImgconvError) throw new VerificationError(`the new image does not open: ${e.message}`);
    throw e;
  }
  try {
    const img = chain.layers[0]!;
    if (img.info.virtualSize !== virtualSize) {
      throw new VerificationError(`virtual size ${img.info.virtualSize} differs from the source's ${virtualSize}`);
    }
    const hasBacking = backing !== undefined;
    if (img.info.backing?.filename !== backing) {
      throw new VerificationError(`backing file ${img.info.backing?.filename} differs from the source's ${backing}`);
    }
    const diff = identity ? await identityEquivalent(expected, await img.mapping(), img.dataDev) : guestEquivalent(expected, await img.mapping(), hasBacking);
    if (diff) throw new VerificationError(`guest mapping differs: ${diff}`);
    const report = await checkImage(img);
    if (report.corruptions > 0 || report.checkErrors > 0) throw new VerificationError(`check found: ${report.messages.slice(0, 3).join('; ')}`);
    return [`probes as ${to}`, 'virtual size unchanged', 'guest mapping identical', 'structure check clean'];
  } finally {
    await chain.close();
  }
}

/**
 * The final fsck: where the target counts unreferenced space as leaked (QED), compact the file;
 * then punch out space the new image does not reference (the old format's tables) and report.
 */
/** The all-zero, `block`-aligned runs of a region, merged. */
function* zeroBlocks(r: Region, block: number): Generator<{ start: number; length: number }> {
  let runStart = -1;
  let pos = Math.ceil(r.offset / block) * block;
  const end = r.offset + r.bytes.length;
  for (; pos + block <= end; pos += block) {
    const chunk = r.bytes.subarray(pos - r.offset, pos - r.offset + block);
    const zero = chunk.every((b) => b === 0);
    if (zero && runStart < 0) runStart = pos;
    if (!zero && runStart >= 0) {
      yield { start: runStart, length: pos - runStart };
      runStart = -1;
    }
  }
  if (runStart >= 0) yield { start: runStart, length: pos - runStart };
}

export async function reclaim(
  path: string,
  dev: BlockDevice,
  drivers: readonly FormatDriver[],
  to: string,
  onProgress?: (bytesDone: number, bytesTotal: number) => void,
  /** Identity targets: the file is cut to this length (the relocation's scratch space past it). */
  truncateTo?: number,
  compactLeaks = true,
  /** Bytes written in place at the commit: their all-zero 4 KiB blocks are punched (identity targets). */
  sparsify?: Region[],
  /** The image is a companion's raw data (VMDK flat): nothing in it to open as the target format. */
  dataOnly = false,
  /** Compaction's batch size (see compact); DEFAULT_WINDOW when not given. */
  compactWindow?: number,
): Promise<{ reclaimedBytes: number; compactMovedBytes: number }> {
  let compactMovedBytes = 0;
  let cut = 0;
  for (const r of sparsify ?? []) {
    for (const z of zeroBlocks(r, 4096)) {
      if (truncateTo !== undefined && z.start >= truncateTo) continue;
      await dev.punchHole(z.start, z.length);
      cut += z.length;
    }
  }
  if (truncateTo !== undefined && (await dev.size()) > truncateTo) {
    cut = (await dev.size()) - truncateTo;
    await dev.truncate(truncateTo);
    await dev.flush();
  }
  if (compactLeaks && findDriver(drivers, to).target?.unreferencedIsLeak) {
    const c = await compact(path, dev, drivers, to, onProgress, compactWindow);
    compactMovedBytes = c.dataMovedBytes + c.tablesMovedBytes;
  }
  if (dataOnly) {
    await dev.flush();
    return { reclaimedBytes: cut, compactMovedBytes };
  }
  const chain = await openImage(path, { drivers, format: to, topDevice: dev, backing: false });
  try {
    const hs = await chain.layers[0]!.hostSpace();
    let reclaimedBytes = cut;
    for (const f of hs.free()) {
      await dev.punchHole(f.start, f.length);
      reclaimedBytes += f.length;
    }
    await dev.flush();
    return { reclaimedBytes, compactMovedBytes };
  } finally {
    await chain.close();
  }
}
