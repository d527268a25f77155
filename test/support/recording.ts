/**
 * Recording, crashing and faulting storage for the crash-consistency harness (test/crash/).
 *
 * RecordingStorage logs every mutating operation across all files — image writes, flushes, truncates,
 * punched holes, and the journal's create/remove/directory sync — in one global order. From such a log
 * the generators below rebuild what the files hold after a crash, in the manner of CrashMonkey/B3,
 * ALICE and SQLite's crash VFS:
 * - process kill (kill -9): every operation before the cut happened; the OS keeps them all;
 * - power loss: per file, only what a flush (fdatasync) made durable — creation/removal only after a
 *   directory sync — plus any subset of the operations issued since, possibly reordered;
 * - torn write: the write in flight lands sector by sector, each 512-byte sector old or new, or one
 *   sector holds garbage (a drive that lost power mid-sector).
 * FaultyStorage throws IoError (EIO, ENOSPC) at a chosen operation, once or from then on.
 *
 * Every sampling choice comes from a seeded PRNG, so a failure reproduces from the printed seed.
 */
import { createHash } from 'node:crypto';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { MemoryStorage, type Storage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';
import { IoError } from '../../src/errors.js';
import { PassThroughStorage, passThroughDevice } from './pass-through.js';

export const SECTOR = 512;
const PAGE = 65536;
const ZERO_PAGE = Buffer.alloc(PAGE);

/** All-zero test by memcmp (a per-byte callback costs ~10 ms per MiB). */
function isZero(b: Uint8Array): boolean {
  return Buffer.from(b.buffer, b.byteOffset, b.length).equals(ZERO_PAGE.subarray(0, b.length));
}

export type Op =
  | { kind: 'write'; path: string; offset: number; bytes: Uint8Array }
  | { kind: 'truncate'; path: string; length: number }
  | { kind: 'punch'; path: string; offset: number; length: number }
  | { kind: 'flush'; path: string }
  | { kind: 'create'; path: string }
  | { kind: 'remove'; path: string }
  | { kind: 'rename'; path: string; to: string }
  | { kind: 'syncDir'; path: string };

export type Files = Map<string, Uint8Array>;

/** A small deterministic PRNG (mulberry32): failures reproduce from the printed seed. */
export function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

export class RecordingStorage extends PassThroughStorage<MemoryStorage> {
  readonly log: Op[] = [];
  readonly initial: Files = new Map();

  constructor(files: Files) {
    super(new MemoryStorage());
    for (const [p, b] of files) {
      this.initial.set(p, b);
      this.live.files.set(p, sparseDevice(b, p));
    }
  }

  /** The files as the recorded operations left them. */
  get live(): MemoryStorage {
    return this.inner;
  }

  /**
   * The current name of each open device's file: a descriptor follows its file across a rename (an
   * adopted data file is written on under the image's name), so its later operations are logged under
   * the new name; a file whose name a rename gave to another is nameless (its operations reach no file).
   */
  private readonly names = new Set<{ path: string }>();

  protected override wrap(d: BlockDevice, path: string): BlockDevice {
    const log = this.log;
    const name = { path };
    this.names.add(name);
    return passThroughDevice(d, {
      path,
      async write(bytes, offset) {
        await d.write(bytes, offset);
        log.push({ kind: 'write', path: name.path, offset, bytes: bytes.slice() });
      },
      async truncate(length) {
        await d.truncate(length);
        log.push({ kind: 'truncate', path: name.path, length });
      },
      async punchHole(offset, length) {
        await d.punchHole(offset, length);
        log.push({ kind: 'punch', path: name.path, offset, length });
      },
      async flush() {
        await d.flush();
        log.push({ kind: 'flush', path: name.path });
      },
      close: async () => {
        this.names.delete(name);
        await d.close();
      },
    });
  }

  override async create(path: string): Promise<BlockDevice> {
    const d = await super.create(path);
    this.log.push({ kind: 'create', path });
    return d;
  }
  override async remove(path: string): Promise<void> {
    await super.remove(path);
    this.log.push({ kind: 'remove', path });
  }
  override async syncDir(path: string): Promise<void> {
    this.log.push({ kind: 'syncDir', path });
  }
  override async rename(from: string, to: string): Promise<void> {
    await super.rename(from, to);
    for (const n of this.names) {
      if (n.path === to) n.path = `${to} (replaced by a rename)`;
      else if (n.path === from) n.path = to;
    }
    this.log.push({ kind: 'rename', path: from, to });
  }
}

/** The bytes of every file of a storage (for building further states from it). */
export function filesOf(s: MemoryStorage): Files {
  const out: Files = new Map();
  for (const [p, d] of s.files) out.set(p, d.snapshot());
  return out;
}

/**
 * One digest over every file's name, length and bytes: equal digests are the same crash state.
 * All-zero pages are skipped (the length and the positions of the others pin them down).
 */
export function storageDigest(s: MemoryStorage): string {
  const h = createHash('sha256');
  const page = new Uint8Array(PAGE);
  for (const [p, d] of [...s.files].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    const len = d.sizeSync();
    h.update(`${p}\0${len}\0`);
    for (let pos = 0; pos < len; pos += PAGE) {
      const n = d.readSync(page, pos);
      const bytes = page.subarray(0, n);
      if (!isZero(bytes)) h.update(`@${pos}`).update(bytes);
    }
  }
  return h.digest('hex');
}

function applyOp(files: Map<string, MemoryBlockDevice>, op: Op): void {
  switch (op.kind) {
    case 'create':
      files.set(op.path, new MemoryBlockDevice(op.path));
      return;
    case 'remove':
      files.delete(op.path);
      return;
    case 'rename': {
      // The file keeps its bytes (and writes made before, durable or not, which a rename does not order).
      const d = files.get(op.path);
      if (!d) return;
      files.delete(op.path);
      files.set(op.to, d);
      return;
    }
    case 'flush':
    case 'syncDir':
      return;
    default: {
      const d = files.get(op.path);
      if (!d) return; // the file's creation was lost
      if (op.kind === 'write') d.writeSync(op.bytes, op.offset);
      // MemoryBlockDevice's truncate and punchHole complete synchronously.
      else if (op.kind === 'truncate') void d.truncate(op.length);
      else void d.punchHole(op.offset, op.length);
    }
  }
}


/**
 * A memory device holding `bytes` where every all-zero 64 KiB page is a hole, as in a sparse file:
 * raw images find their holes with SEEK_DATA/SEEK_HOLE, and reclaim punches holes, so a state that
 * went through bytes must keep them (MemoryBlockDevice allocates pages by 64 KiB).
 */
export function sparseDevice(bytes: Uint8Array, path: string): MemoryBlockDevice {
  const d = new MemoryBlockDevice(path);
  for (let pos = 0; pos < bytes.length; pos += PAGE) {
    const page = bytes.subarray(pos, Math.min(bytes.length, pos + PAGE));
    if (!isZero(page)) d.writeSync(page, pos);
  }
  void d.truncate(bytes.length); // synchronous for memory devices: sets the length
  return d;
}

function loadFiles(initial: Files): Map<string, MemoryBlockDevice> {
  const files = new Map<string, MemoryBlockDevice>();
  for (const [p, b] of initial) files.set(p, sparseDevice(b, p));
  return files;
}

function toStorage(files: Map<string, MemoryBlockDevice>): MemoryStorage {
  const s = new MemoryStorage();
  for (const [p, d] of files) s.files.set(p, d);
  return s;
}

/** Files as they are after the first `n` operations all happened (process kill). */
export function stateAfter(initial: Files, log: Op[], n: number): MemoryStorage {
  const files = loadFiles(initial);
  for (let i = 0; i < n; i++) applyOp(files, log[i]!);
  return toStorage(files);
}

/** For a cut before operation `n`: which operations a flush or directory sync made durable. */
export function durability(log: Op[], n: number): { durable: (i: number) => boolean; volatile: number[] } {
  const lastFlush = new Map<string, number>();
  let lastDirSync = -1;
  for (let i = 0; i < n; i++) {
    const op = log[i]!;
    if (op.kind === 'flush') lastFlush.set(op.path, i);
    if (op.kind === 'syncDir') lastDirSync = i;
  }
  const durable = (i: number): boolean => {
    const op = log[i]!;
    if (op.kind === 'flush' || op.kind === 'syncDir') return true;
    if (op.kind === 'create' || op.kind === 'remove' || op.kind === 'rename') return i < lastDirSync;
    return i < (lastFlush.get(op.path) ?? -1);
  };
  const volatile: number[] = [];
  for (let i = 0; i < n; i++) if (!durable(i)) volatile.push(i);
  return { durable, volatile };
}

/**
 * Power loss before operation `n`: durable operations apply in log order; of the volatile ones, those
 * in `kept` apply too, in the order given (a reordering when it differs from log order).
 */
export function powerLossState(initial: Files, log: Op[], n: number, kept: number[], torn?: { index: number; mask: boolean[] }): MemoryStorage {
  const { durable } = durability(log, n);
  const files = loadFiles(initial);
  // Durable operations first, in order; then the surviving volatile ones. Volatile operations of a
  // file all come after its last durable one, so this is a legal order for each file.
  for (let i = 0; i < n; i++) if (durable(i)) applyOp(files, log[i]!);
  for (const i of kept) {
    const op = log[i]!;
    if (torn && torn.index === i && op.kind === 'write') {
      // Only the sectors the mask names reached the disk.
      const d = files.get(op.path);
      if (d) writeSectors(op).forEach(([a, b], j) => torn.mask[j] && d.writeSync(op.bytes.subarray(a, b), op.offset + a));
    } else applyOp(files, op);
  }
  return toStorage(files);
}

export interface PowerTornChoice {
  cut: number;
  kept: number[];
  torn: { index: number; mask: boolean[] };
}

/**
 * Power loss with a torn write: any write not yet flushed may reach the disk only in part. For each
 * volatile write of two or more sectors, every old/new sector mask up to `exhaustiveUpTo` sectors
 * (`sampled` masks beyond), each with a random subset of the other volatile operations kept.
 */
export function* powerTornChoices(log: Op[], cut: number, rnd: () => number, exhaustiveUpTo: number, sampled: number): Generator<PowerTornChoice> {
  const vol = volatileOps(log, cut);
  for (const w of vol) {
    const op = log[w]!;
    if (op.kind !== 'write') continue;
    const k = writeSectors(op).length;
    if (k < 2) continue;
    const masks: boolean[][] = [];
    if (k <= exhaustiveUpTo) for (let m = 1; m < (1 << k) - 1; m++) masks.push(Array.from({ length: k }, (_, j) => (m & (1 << j)) !== 0));
    else for (let s = 0; s < sampled; s++) masks.push(Array.from({ length: k }, () => rnd() < 0.5));
    for (const mask of masks) yield { cut, kept: vol.filter((i) => i === w || rnd() < 0.5), torn: { index: w, mask } };
  }
}

/** Indices of operations after the last durability point of their file (candidates to lose). */
export function volatileOps(log: Op[], n: number): number[] {
  return durability(log, n).volatile;
}

/**
 * Cuts worth taking for power loss: just before each flush or directory sync, and at the end. A cut
 * between two such points loses nothing the later cut cannot (its volatile set is a subset of the
 * later one's and nothing became durable in between).
 */
export function powerLossCuts(log: Op[]): number[] {
  const cuts: number[] = [];
  for (let i = 0; i < log.length; i++) if (log[i]!.kind === 'flush' || log[i]!.kind === 'syncDir') cuts.push(i);
  cuts.push(log.length);
  return cuts;
}

function overlaps(a: Op, b: Op): boolean {
  if (a.path !== b.path) return false;
  if (a.kind !== 'write' || b.kind !== 'write') return true; // truncate/punch/create/remove: order matters
  return a.offset < b.offset + b.bytes.length && b.offset < a.offset + a.bytes.length;
}

export interface PowerLossChoice {
  cut: number;
  kept: number[];
  /** The kept writes applied in a shuffled order. */
  reordered: boolean;
}

/**
 * The volatile subsets for a cut: all of them up to `exhaustiveUpTo` volatile operations, `sampled`
 * random ones beyond (plus none, all, and each one alone or left out). Where kept writes overlap, the
 * subset is also applied reordered (writes shuffled among themselves; the order of truncates, punches,
 * creates and removals relative to the rest is kept).
 */
export function* powerLossChoices(log: Op[], cut: number, rnd: () => number, exhaustiveUpTo: number, sampled: number): Generator<PowerLossChoice> {
  const vol = volatileOps(log, cut);
  const subsets: number[][] = [];
  if (vol.length <= exhaustiveUpTo) {
    for (let mask = 0; mask < 1 << vol.length; mask++) subsets.push(vol.filter((_, j) => mask & (1 << j)));
  } else {
    subsets.push([], vol.slice());
    for (let j = 0; j < vol.length; j++) {
      subsets.push([vol[j]!]);
      subsets.push(vol.filter((_, k) => k !== j));
    }
    for (let s = 0; s < sampled; s++) subsets.push(vol.filter(() => rnd() < 0.5));
  }
  for (const kept of subsets) {
    yield { cut, kept, reordered: false };
    const writes = kept.filter((i) => log[i]!.kind === 'write');
    let anyOverlap = false;
    for (let a = 0; a < kept.length && !anyOverlap; a++) for (let b = a + 1; b < kept.length; b++) if (overlaps(log[kept[a]!]!, log[kept[b]!]!)) anyOverlap = true;
    if (!anyOverlap || writes.length < 2) continue;
    const shuffled = writes.slice();
    for (let j = shuffled.length - 1; j > 0; j--) {
      const k = Math.floor(rnd() * (j + 1));
      [shuffled[j], shuffled[k]] = [shuffled[k]!, shuffled[j]!];
    }
    let w = 0;
    yield { cut, kept: kept.map((i) => (log[i]!.kind === 'write' ? shuffled[w++]! : i)), reordered: true };
  }
}

export interface TornChoice {
  /** Index of the write in flight; every operation before it happened. */
  index: number;
  /** Per sector of the write (absolute 512-byte sectors it touches): true = new bytes landed. */
  mask: boolean[];
  /** A sector (index into the write's sectors) that holds garbage instead, or -1. */
  garbage: number;
}

/** The sectors a write touches, as [start, end) ranges inside its bytes. */
export function writeSectors(op: Op & { kind: 'write' }): [number, number][] {
  const out: [number, number][] = [];
  const end = op.offset + op.bytes.length;
  for (let pos = op.offset; pos < end; ) {
    const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
    out.push([pos - op.offset, next - op.offset]);
    pos = next;
  }
  return out;
}

/**
 * Torn versions of write `index`: all old/new sector combinations up to `exhaustiveUpTo` sectors
 * (sampled beyond: `sampled` random masks plus halves and alternations), and `garbageSectors` states with one
 * sector of garbage (every sector when the write has that many or fewer; else sampled).
 */
export function* tornChoices(log: Op[], index: number, rnd: () => number, exhaustiveUpTo: number, sampled: number, garbageSectors: number): Generator<TornChoice> {
  const op = log[index]!;
  if (op.kind !== 'write') return;
  const k = writeSectors(op).length;
  const all = (v: boolean) => new Array<boolean>(k).fill(v);
  if (k >= 2) {
    if (k <= exhaustiveUpTo) {
      // Every mask but all-old and all-new (those are the kill states before and after the write).
      for (let mask = 1; mask < (1 << k) - 1; mask++) yield { index, mask: Array.from({ length: k }, (_, j) => (mask & (1 << j)) !== 0), garbage: -1 };
    } else {
      const half = Math.floor(k / 2);
      yield { index, mask: Array.from({ length: k }, (_, j) => j < half), garbage: -1 };
      yield { index, mask: Array.from({ length: k }, (_, j) => j >= half), garbage: -1 };
      yield { index, mask: Array.from({ length: k }, (_, j) => j % 2 === 0), garbage: -1 };
      yield { index, mask: Array.from({ length: k }, (_, j) => j === 0), garbage: -1 };
      yield { index, mask: Array.from({ length: k }, (_, j) => j !== k - 1), garbage: -1 };
      for (let s = 0; s < sampled; s++) yield { index, mask: Array.from({ length: k }, () => rnd() < 0.5), garbage: -1 };
    }
  }
  const sectors = k <= garbageSectors ? Array.from({ length: k }, (_, j) => j) : Array.from({ length: garbageSectors }, () => Math.floor(rnd() * k));
  for (const g of new Set(sectors)) yield { index, mask: all(true), garbage: g };
}

/** The state with write `c.index` torn as `c` says; garbage bytes come from `seed`. */
export function tornState(initial: Files, log: Op[], c: TornChoice, seed: number): MemoryStorage {
  const s = stateAfter(initial, log, c.index);
  const op = log[c.index]! as Op & { kind: 'write' };
  const d = s.files.get(op.path);
  if (!d) return s; // written to a file whose creation is not in this state
  const sectors = writeSectors(op);
  const rnd = prng(seed);
  sectors.forEach(([a, b], j) => {
    if (j === c.garbage) {
      const junk = new Uint8Array(b - a);
      for (let x = 0; x < junk.length; x++) junk[x] = Math.floor(rnd() * 256);
      d.writeSync(junk, op.offset + a);
    } else if (c.mask[j]) d.writeSync(op.bytes.subarray(a, b), op.offset + a);
    else if (op.offset + a >= d.sizeSync()) {
      // Old bytes past the end: the file does not grow for this sector; a later sector landing
      // extends it with zeros in between, as a file system does.
    }
  });
  return s;
}

export type FaultCode = 'EIO' | 'ENOSPC';

/** Which operations a fault can hit: mutations (any code) and reads (EIO only). */
export type FaultableOp = 'open' | 'create' | 'remove' | 'rename' | 'syncDir' | 'read' | 'write' | 'flush' | 'truncate' | 'punch';

/**
 * A storage that throws IoError(code) at the `at`-th faultable operation (0-based, counted over
 * every file), and — when `persistent` — at every later one too (a dead disk, a full file system).
 * ENOSPC hits only operations that can allocate (write, truncate, create, flush); EIO any of them.
 * `count` tells how many faultable operations a run made (run once with at = -1 to learn it).
 */
export class FaultyStorage extends PassThroughStorage {
  count = 0;
  /** The operation the first fault hit, for messages. */
  hit: string | undefined;
  /** When set, every operation that counts, in order ("flush /x.imgconv-journal@0"): to find where to fault. */
  log: string[] | undefined;

  constructor(
    inner: Storage,
    readonly code: FaultCode,
    readonly at: number,
    readonly persistent: boolean,
  ) {
    super(inner);
  }

  private canFail(op: FaultableOp): boolean {
    if (this.code === 'EIO') return true;
    return op === 'write' || op === 'truncate' || op === 'create' || op === 'flush';
  }

  private gate(op: FaultableOp, path: string, offset = 0): void {
    if (!this.canFail(op)) return;
    const n = this.count++;
    this.log?.push(`${op} ${path}@${offset}`);
    if (this.at < 0) return;
    if (n === this.at || (this.persistent && n > this.at)) {
      this.hit ??= `${op} ${path}@${offset} (operation ${n})`;
      throw new IoError(op, path, offset, this.code, this.code === 'EIO' ? 'input/output error (injected)' : 'no space left on device (injected)');
    }
  }

  protected override wrap(d: BlockDevice, path: string): BlockDevice {
    return passThroughDevice(d, {
      path,
      read: async (b, o) => {
        this.gate('read', path, o);
        return d.read(b, o);
      },
      write: async (bytes, offset) => {
        this.gate('write', path, offset);
        return d.write(bytes, offset);
      },
      truncate: async (length) => {
        this.gate('truncate', path, length);
        return d.truncate(length);
      },
      punchHole: async (offset, length) => {
        this.gate('punch', path, offset);
        return d.punchHole(offset, length);
      },
      flush: async () => {
        this.gate('flush', path);
        return d.flush();
      },
    });
  }

  override async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    this.gate('open', path);
    return super.open(path, opts);
  }
  override async create(path: string): Promise<BlockDevice> {
    this.gate('create', path);
    return super.create(path);
  }
  override async remove(path: string): Promise<void> {
    this.gate('remove', path);
    return super.remove(path);
  }
  override async syncDir(path: string): Promise<void> {
    this.gate('syncDir', path);
    return super.syncDir(path);
  }
  override async rename(from: string, to: string): Promise<void> {
    this.gate('rename', from);
    return super.rename(from, to);
  }
}

/** A MemoryStorage holding copies of `files`. */
export function memoryStorageOf(files: Files): MemoryStorage {
  const s = new MemoryStorage();
  for (const [p, b] of files) s.files.set(p, sparseDevice(b, p));
  return s;
}
