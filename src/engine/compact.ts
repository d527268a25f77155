/**
 * Compaction, the last part of reclaim for formats whose checker counts every unreferenced cluster
 * as leaked (QED). After a conversion the old format's tables leave holes inside the file; the new
 * tables sit at its end. The compacted file is exactly as long as what it holds, E0 = used bytes:
 * a window [E0 − T, E0) is kept for the T bytes of tables that lie above it. Tables reaching into the
 * window first go to scratch space past the end (those wholly above E0 stay where they are), data in
 * the window or past E0 moves down into the holes, then the tables move into the window, level by
 * level, and the tail is cut off.
 *
 * Every move is MirageOS qcow's state machine: copy into space nothing references → flush → write the
 * one pointer (an aligned 8-byte entry, inside one sector) → flush; only then is the old place free,
 * and it is reused only in a later round, after the image is re-read. The data moves in batches of at
 * most a window of bytes, each its own copy → flush → repoint → flush, after which the batch's old
 * places — unreferenced once its pointers are durable — are punched: the disk holds at most one
 * batch's copies at once instead of every byte moved. No batch writes where another batch's data
 * came from (every destination lies below the window, every source at or above its start), so the
 * punched places are not reused before the image is re-read. A crash at any instant leaves a valid
 * image whose only defect can be a leak (a copy not yet pointed to, an old place not yet punched),
 * and running reclaim again continues.
 */
import { FreeSpaceCopier, type CopyRun } from '../blockdev/copy.js';
import { coalesce, DEFAULT_WINDOW } from './relocate.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { FormatDriver, Relocatable, SourceImage } from '../driver.js';
import type { FreeRange } from '../host-space.js';
import { alignUp } from '../binary.js';
import { firstFit } from './allocator.js';
import { openImage, type ImageChain } from '../image.js';

export interface CompactResult {
  dataMovedBytes: number;
  tablesMovedBytes: number;
  lengthBefore: number;
  lengthAfter: number;
}

/** Table levels, highest first; data is level 0. Pointers of level n live in level n+1. */
const TABLE_LEVELS = [1, 2];
/** The longest copy run (the copier holds two buffers of it). */
const COPY_RUN = 8 << 20;

export async function compact(
  path: string,
  dev: BlockDevice,
  drivers: readonly FormatDriver[],
  to: string,
  onProgress?: (bytesDone: number, bytesTotal: number) => void,
  /** Most bytes of data copied before their old places are freed (a batch of round B). */
  window: number = DEFAULT_WINDOW,
): Promise<CompactResult> {
  const open = async () => openImage(path, { drivers, format: to, topDevice: dev, backing: false });
  const withImage = async <T>(fn: (img: SourceImage) => Promise<T>): Promise<T> => {
    const chain = await open();
    try {
      return await fn(chain.layers[0]!);
    } finally {
      await chain.close();
    }
  };
  const lengthBefore = await dev.size();
  const result: CompactResult = { dataMovedBytes: 0, tablesMovedBytes: 0, lengthBefore, lengthAfter: lengthBefore };

  // An image is read once and serves every round until something it describes moves: each round
  // below re-reads it only when an earlier round changed where its pointers or free space lie.
  let chain: ImageChain | undefined = await open();
  let cs: number;
  try {
    const img0 = chain.layers[0]!;
    if (!img0.relocatable || !img0.info.clusterSize) return result;
    cs = img0.info.clusterSize;
    const E0 = clustersCovered((await img0.hostSpace()).ranges(), cs) * cs;
    if (E0 >= lengthBefore) return result; // nothing to reclaim
    // One copier for every round: its buffers are faulted in once, and it tracks the file's length
    // (only its copies and the pointer writes change it until the tail is cut below).
    const copier = await FreeSpaceCopier.open(dev, COPY_RUN);
    // T: bytes of tables that must end up in the window below E0 (a fixed point: the window's start
    // decides which tables count as above it).
    let T = 0;
    const tablesAbove = async (minHost: number) => {
      const out: Relocatable[][] = [];
      for (const level of TABLE_LEVELS) out.push(await img0.relocatable!(level, minHost));
      return out;
    };
    let tables = await tablesAbove(E0 - T);
    for (;;) {
      const next = tables.flat().reduce((s, t) => s + t.length, 0);
      if (next <= T) break;
      T = next;
      tables = await tablesAbove(E0 - T);
    }
    // Round A: tables reaching into the window cannot slide into it safely (a move overlapping the live
    // table would overwrite it before its pointer flips), so they first go to scratch space past the end;
    // so do those already inside it (left where they are, they would split it into pieces too small for
    // the others). Tables wholly at or above E0 stay: the window never overlaps them, so round C moves
    // them straight in, and each moves once instead of twice.
    const out = tables.map((level) => level.filter((r) => r.host < E0));
    const bytesOf = (rs: Relocatable[]) => rs.reduce((s, r) => s + r.length, 0);
    // For progress only: the tables going out and back in (or only in), the data above the window once.
    const dataAbove = bytesOf(await img0.relocatable!(0, E0 - T));
    const total = 2 * bytesOf(out.flat()) + bytesOf(tables.flat().filter((r) => r.host >= E0)) + dataAbove;
    let done = 0;
    const moved = (n: number) => {
      done += n;
      onProgress?.(Math.min(done, total), total);
    };
    onProgress?.(0, total);

    if (out.some((level) => level.length > 0)) {
      let scratch = alignUp(Math.max(await dev.size(), lengthBefore), cs);
      // Level by level, highest-numbered last: an L2 table's pointer lives in the L1 table, which stays
      // where it is until its own level moves; so one reading of the image serves both levels.
      for (const level of out) {
        const moves = level.map((r) => {
          const to = scratch;
          scratch += alignUp(r.length, cs);
          return { r, to };
        });
        result.tablesMovedBytes += await applyMoves(dev, copier, moves, moved);
      }
      // Data pointers live in the tables that just moved: read the image again.
      await chain.close();
      chain = undefined;
      chain = await open();
    }

    // Round B: data in the window or beyond E0 moves into holes below the window.
    {
      const img = chain.layers[0]!;
      const slots = clusterSlots(freeBelow((await img.hostSpace()).free(), E0 - T), cs);
      // The highest clusters if the holes cannot take them all; then paired in ascending order on both
      // sides, so runs of neighbouring clusters that land in a run of neighbouring holes copy as one.
      const data = (await img.relocatable!(0, E0 - T))
        .sort((a, b) => b.host - a.host)
        .slice(0, slots.length)
        .sort((a, b) => a.host - b.host);
      // Every slot lies below E0 − T and every listed cluster at or above it, so each move goes down,
      // and no batch's destination is another batch's source.
      const moves = data.map((r, i) => ({ r, to: slots[i]! }));
      for (const batch of batches(moves, window)) {
        result.dataMovedBytes += await applyMoves(dev, copier, batch, moved);
        // The batch's pointers are durable: its old places are unreferenced. Punched now, so that the
        // next batch's copies take the space these free (a crash before the punch leaves a leak).
        for (const z of mergedRanges(batch.map(({ r }) => ({ start: r.host, end: r.host + r.length })))) await dev.punchHole(z.start, z.end - z.start);
      }
    }
    await chain.close();
    chain = undefined;

    // Round C: tables above E0, lowest level first, first fit into the free window below E0 (freed by
    // rounds A and B, so read afresh). One reading serves both levels: the L1 table stays where it is
    // while the L2 tables' pointers in it are rewritten, and it then takes the next free place — never
    // one an L2 table left in this round.
    chain = await open();
    {
      const img = chain.layers[0]!;
      const free = freeBelow((await img.hostSpace()).free(), E0).map((f) => ({ ...f }));
      for (const level of TABLE_LEVELS) {
        const tables = (await img.relocatable!(level, E0)).sort((a, b) => a.host - b.host);
        const moves: { r: Relocatable; to: number }[] = [];
        for (const r of tables) {
          const at = firstFit(free, r.length, cs);
          if (at === undefined || at >= r.host) continue;
          moves.push({ r, to: at });
        }
        result.tablesMovedBytes += await applyMoves(dev, copier, moves, moved);
      }
    }
  } finally {
    await chain?.close();
  }
  // Cut the tail nothing references any more.
  const end = await withImage(async (img) => alignUp((await img.hostSpace()).usedEnd(), cs));
  if (end < (await dev.size())) {
    await dev.truncate(end);
    await dev.flush();
  }
  result.lengthAfter = await dev.size();
  return result;
}

/** Consecutive runs of moves of at most `window` bytes each (at least one move each). */
export function batches<M extends { r: { length: number } }>(moves: M[], window: number): M[][] {
  const out: M[][] = [];
  let cur: M[] = [];
  let bytes = 0;
  for (const m of moves) {
    if (cur.length > 0 && bytes + m.r.length > window) {
      out.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(m);
    bytes += m.r.length;
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

/**
 * Copies, flushes, repoints, flushes. Returns the bytes moved. Moves whose sources and destinations
 * both continue each other are copied as one run, and pointers stored side by side (neighbouring L2
 * entries) are written as one buffer: a moving conversion relocates hundreds of thousands of clusters.
 * The copies go through the compaction's one FreeSpaceCopier (src/blockdev/copy.ts, as relocation's
 * rounds): sources are live structures and destinations free space nothing references until the
 * pointers below are written, so they never overlap, and stale bytes in a destination are overwritten
 * (non-zero blocks) or punched (zero blocks) — no punch of every destination first.
 */
async function applyMoves(dev: BlockDevice, copier: FreeSpaceCopier, moves: { r: Relocatable; to: number }[], onCopied?: (bytes: number) => void): Promise<number> {
  if (moves.length === 0) return 0;
  // Runs of moves whose sources and destinations both continue each other are one copy, in pieces of
  // at most the copier's buffer.
  const runs: CopyRun[] = [];
  let bytes = 0;
  let i = 0;
  while (i < moves.length) {
    const from = moves[i]!.r.host;
    const to = moves[i]!.to;
    let length = moves[i]!.r.length;
    let j = i + 1;
    while (j < moves.length && moves[j]!.r.host === from + length && moves[j]!.to === to + length) length += moves[j++]!.r.length;
    for (let off = 0; off < length; off += copier.runBytes) runs.push({ from: from + off, to: to + off, length: Math.min(copier.runBytes, length - off) });
    bytes += length;
    i = j;
  }
  await copier.copy(runs, (n) => onCopied?.(n));
  await dev.flush();
  const pointers = moves.map(({ r, to }) => ({ offset: r.pointer.offset, bytes: r.pointer.encode(to) })).sort((a, b) => a.offset - b.offset);
  // Neighbouring pointers as one write.
  for (const w of coalesce(pointers)) {
    await dev.write(w.bytes, w.offset);
    copier.wrote(w.offset, w.bytes.length);
  }
  await dev.flush();
  return bytes;
}

/** Non-empty [start, end) ranges merged where they touch or overlap, ascending. */
export function mergedRanges(ranges: { start: number; end: number }[]): { start: number; end: number }[] {
  const sorted = ranges.filter((r) => r.end > r.start).sort((a, b) => a.start - b.start);
  const out: { start: number; end: number }[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.start <= last.end) last.end = Math.max(last.end, r.end);
    else out.push({ start: r.start, end: r.end });
  }
  return out;
}

/**
 * Whole clusters that the ranges touch, each counted once (a partial last data cluster is recorded as
 * two ranges — the data and its tail past the virtual size — and must count as one cluster).
 */
export function clustersCovered(ranges: FreeRange[], cs: number): number {
  const sorted = ranges.slice().sort((a, b) => a.start - b.start);
  let count = 0;
  let covered = -1; // index of the last cluster counted
  for (const r of sorted) {
    if (r.length <= 0) continue;
    const first = Math.max(Math.floor(r.start / cs), covered + 1);
    const last = Math.floor((r.start + r.length - 1) / cs);
    if (last >= first) {
      count += last - first + 1;
      covered = last;
    }
  }
  return count;
}

function freeBelow(free: FreeRange[], limit: number): FreeRange[] {
  return free.filter((f) => f.start < limit).map((f) => ({ start: f.start, length: Math.min(f.length, limit - f.start) }));
}

/** Cluster-aligned slots inside the free ranges, ascending. */
function clusterSlots(free: FreeRange[], cs: number): number[] {
  const out: number[] = [];
  for (const f of free) {
    for (let s = alignUp(f.start, cs); s + cs <= f.start + f.length; s += cs) out.push(s);
  }
  return out;
}

/**
 * What compact() will move, predicted from a planned layout (header ranges, table ranges, data ranges,
 * each cluster-aligned) by the same rules: the tables reaching into the window go out and back in, those
 * wholly above it move in once, data above the window's start moves into holes below it.
 */
export function estimateCompaction(p: { cs: number; header: FreeRange[]; tables: FreeRange[]; data: FreeRange[]; fileLength: number }): { tablesBytes: number; dataBytes: number; finalLength: number } {
  const { cs } = p;
  const E0 = clustersCovered([...p.header, ...p.tables, ...p.data], cs) * cs;
  // Compaction packs everything below E0 and cuts the file there; with nothing to reclaim it leaves the length.
  if (E0 >= alignUp(p.fileLength, cs)) return { tablesBytes: 0, dataBytes: 0, finalLength: p.fileLength };
  let T = 0;
  let tables: FreeRange[] = [];
  for (;;) {
    tables = p.tables.filter((t) => t.start + t.length > E0 - T);
    const next = tables.reduce((s, t) => s + alignUp(t.length, cs), 0);
    if (next <= T) break;
    T = next;
  }
  const limit = E0 - T;
  // Tables below E0 go out to scratch and back in (twice); those wholly at or above it move in once.
  const tablesBytes = tables.reduce((s, t) => s + alignUp(t.length, cs) * (t.start < E0 ? 2 : 1), 0);
  const above = (rs: FreeRange[]) => rs.reduce((s, r) => s + Math.max(0, alignUp(r.start + r.length, cs) - Math.max(r.start, limit)), 0);
  const below = (rs: FreeRange[]) => rs.reduce((s, r) => s + Math.max(0, Math.min(alignUp(r.start + r.length, cs), limit) - r.start), 0);
  const holesBelow = limit - below(p.header) - below(p.tables) - below(p.data);
  return { tablesBytes, dataBytes: Math.min(above(p.data), Math.max(0, holesBelow)), finalLength: E0 };
}
