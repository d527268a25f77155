/**
 * Relocation of live source data, for targets that need data somewhere else than where it lies —
 * identity placement (raw, VHD fixed: guest offset = host offset). Each step is MirageOS qcow's move
 * state machine applied to the *source* format: copy a data unit into space nothing references →
 * flush → rewrite the one pointer to it in the source's own table (SourceImage.relocatable) → flush;
 * the unit's old place becomes free only after that. So the file is a valid source image at every
 * instant and a crash needs no undo: the source simply reads its data from wherever the last durable
 * pointer says.
 *
 * The plan is computed up front (pure, so `plan` reports exactly what `inplace` moves) as rounds: every
 * unit whose identity place is free moves there; when too little is ready — chains (data shifted by a
 * few clusters, as after any format's header) or cycles (a permutation) — units standing in the way are
 * evicted to a bounded scratch window past the end of everything, and come back once their own place is
 * free. A unit is evicted at most once (scratch is nobody's target), so the plan always terminates, and
 * every byte moves at most twice.
 *
 * Not moved: the source's headers and tables. Where they lie inside the disk's range they are *pinned*;
 * the commit record carries the guest bytes for those ranges (and for units whose identity place
 * overlaps them, which stay parked) and writes them at the commit point, so the journal holds about the
 * size of the source's metadata, not of its data.
 */
import type { BlockDevice } from '../blockdev/types.js';
import type { Relocatable } from '../driver.js';
import { alignUp } from '../binary.js';
import type { FreeRange } from '../host-space.js';
import { IntervalSet } from './intervals.js';
import { FreeSpaceCopier, gatherRuns, type GatherRun } from '../blockdev/copy.js';
import { HOLE_BLOCK, isZeroRange } from '../blockdev/sparse.js';

/** One movable data unit of the source (a cluster, grain or block), with where its pointer lives. */
export interface Unit extends Relocatable {
  guest: number;
}

export interface Step {
  unit: number;
  from: number;
  to: number;
  length: number;
  /** 'place': to the unit's identity place; 'evict': out of the way, into scratch. */
  kind: 'place' | 'evict';
}

export interface RelocationPlan {
  rounds: Step[][];
  movedBytes: number;
  /** Bytes of the largest round: the second copies on disk at once before their old places are punched. */
  largestRound: number;
  /** Most scratch bytes in use at once, and how far past scratchBase the scratch reached. */
  scratchPeak: number;
  scratchEnd: number;
  /** Units that cannot take their identity place (it overlaps a pinned structure): their guest bytes go into the commit record. */
  parked: number[];
  /** Units at their identity place once the plan has run. */
  placed: number[];
}

export interface RelocationInput {
  units: Unit[];
  /** Live host ranges that do not move (the source's headers and tables). */
  pinned: FreeRange[];
  virtualSize: number;
  /** Scratch space starts here (past the file, the disk's range and every structure). */
  scratchBase: number;
  /** Host alignment a unit needs in the source format (QED: cluster; VMDK: sector). */
  alignment: number;
  /** Scratch bytes in use at once, softly: the eviction budget. */
  window: number;
}

/** Below this many bytes ready to place in a round, units in the way are evicted to scratch. */
export const EVICT_BELOW = 4 << 20;
export const DEFAULT_WINDOW = 64 << 20;

export function planRelocation(input: RelocationInput): RelocationPlan {
  const { units, virtualSize, alignment } = input;
  const pinned = new IntervalSet();
  for (const p of input.pinned) pinned.add(p.start, p.length);
  const free = new IntervalSet();
  free.add(0, Number.MAX_SAFE_INTEGER);
  for (const p of input.pinned) free.remove(p.start, p.length);
  for (const u of units) free.remove(u.host, u.length);

  const host = units.map((u) => u.host);
  const target = units.map((u) => (u.guest % alignment === 0 && !pinned.intersects(u.guest, u.length) ? u.guest : undefined));
  const parked: number[] = [];
  // Units still to move, one flag each (a Set of hundreds of thousands of grains was a hot spot).
  const pending = new Uint8Array(units.length);
  let pendingCount = 0;
  units.forEach((u, i) => {
    if (target[i] === undefined) {
      parked.push(i);
      // A parked unit inside the disk's range would be read as guest data once the file is raw.
      if (u.host < virtualSize) pending[i] = 1;
    } else if (target[i] !== u.host) pending[i] = 1;
    pendingCount += pending[i]!;
  });

  // Who lies where: units never share a byte (host space rejects overlaps, and a unit only moves into
  // free space), so a lookup by place finds each unit in the way exactly once.
  const places = new UnitPlaces(units);
  units.forEach((u, i) => places.put(i, u.host));

  const scratch = new IntervalSet();
  let scratchInUse = 0;
  let scratchPeak = 0;
  let scratchEnd = input.scratchBase;
  const allocScratch = (length: number): number => {
    const at = free.firstFit(input.scratchBase, length, alignment);
    free.remove(at, length);
    scratch.add(at, length);
    scratchInUse += length;
    scratchPeak = Math.max(scratchPeak, scratchInUse);
    scratchEnd = Math.max(scratchEnd, at + length);
    return at;
  };

  const rounds: Step[][] = [];
  let movedBytes = 0;
  const byTarget: number[] = [];
  for (let i = 0; i < units.length; i++) if (pending[i] && target[i] !== undefined) byTarget.push(i);
  byTarget.sort((a, b) => target[a]! - target[b]!);
  // byTarget[0..done) are no longer pending (a unit never becomes pending again): both scans of a round
  // start past them instead of testing every unit placed so far (2 M VMDK grains, dozens of rounds).
  let done = 0;
  while (pendingCount > 0) {
    while (done < byTarget.length && !pending[byTarget[done]!]) done++;
    const round: Step[] = [];
    const moving = new Set<number>();
    let readyBytes = 0;
    for (let k = done; k < byTarget.length; k++) {
      const i = byTarget[k]!;
      if (!pending[i]) continue;
      const t = target[i]!;
      const len = units[i]!.length;
      if (!free.contains(t, len)) continue;
      // A round's copies are extra disk space until its old places are punched: bounded by the window.
      if (readyBytes > 0 && readyBytes + len > input.window) break;
      free.remove(t, len);
      round.push({ unit: i, from: host[i]!, to: t, length: len, kind: 'place' });
      moving.add(i);
      readyBytes += len;
    }
    if (readyBytes < Math.min(EVICT_BELOW, input.window)) {
      const evict = (i: number): boolean => {
        if (moving.has(i) || host[i]! >= input.scratchBase) return false;
        if (round.length > 0 && scratchInUse + units[i]!.length > input.window) return false;
        round.push({ unit: i, from: host[i]!, to: allocScratch(units[i]!.length), length: units[i]!.length, kind: 'evict' });
        moving.add(i);
        return true;
      };
      for (const i of parked) if (pending[i]) evict(i);
      for (let k = done; k < byTarget.length; k++) {
        const i = byTarget[k]!;
        if (!pending[i] || moving.has(i)) continue;
        // The units in the way, from the lowest place up.
        for (const o of places.within(target[i]!, units[i]!.length, host)) evict(o);
        if (scratchInUse >= input.window && round.length > 0) break;
      }
    }
    if (round.length === 0) throw new Error('relocation made no progress (a unit is blocked by something that is not a unit)');
    for (const s of round) {
      const i = s.unit;
      places.take(i, s.from);
      free.add(s.from, s.length);
      if (scratch.contains(s.from, s.length)) {
        scratch.remove(s.from, s.length);
        scratchInUse -= s.length;
      }
      host[i] = s.to;
      movedBytes += s.length;
      places.put(i, s.to);
      if (pending[i] && (s.to === target[i] || (target[i] === undefined && s.to >= virtualSize))) {
        pending[i] = 0;
        pendingCount--;
      }
    }
    rounds.push(round);
  }
  const placed = units.map((_, i) => i).filter((i) => target[i] !== undefined && host[i] === target[i]);
  const largestRound = rounds.reduce((m, r) => Math.max(m, r.reduce((s, x) => s + x.length, 0)), 0);
  return { rounds, movedBytes, largestRound, scratchPeak, scratchEnd, parked, placed };
}

/**
 * Most extra disk space an identity conversion holds at once, for `imgconv plan`. Relocation is
 * space-neutral per round: every copy (to a unit's identity place or, evicted, to scratch) is made
 * before its old place is punched, and the round ends by punching them all. So while relocating, the
 * extra space is one round's copies (`largestRound`); units parked in scratch take no more than the
 * places they left, and the scratch window is not added on top. At the commit, the journal holds the
 * COMMIT record (`commitBytes` new and `commitBytes` old), and writing the redo bytes in place may fill
 * holes inside the source's structures (at most `commitBytes` more). The two phases do not overlap.
 */
export function identityPeakExtra(plan: Pick<RelocationPlan, 'largestRound'>, commitBytes: number): number {
  return Math.max(plan.largestRound, 3 * commitBytes);
}

/** UnitPlaces' smallest bucket: 512-byte grains share one instead of taking a map entry each. */
const BUCKET_MIN = 64 << 10;

/**
 * Where the relocation planner's units lie, for "which units overlap this range": units by the bucket
 * of `size` bytes (the longest unit, at least BUCKET_MIN) their first byte falls in, so a range meets
 * the units of its own buckets and of the one before. One entry per unit: a map of every 512-byte
 * granule each unit covers (VMDK grains are sector-aligned) took 4 s of a 1 GiB qcow2 → raw plan.
 */
class UnitPlaces {
  private readonly buckets = new Map<number, number[]>();
  private readonly size: number;

  constructor(private readonly units: readonly Unit[]) {
    this.size = units.reduce((m, u) => Math.max(m, u.length), BUCKET_MIN);
  }

  /** Unit `i` now lies at `at`. */
  put(i: number, at: number): void {
    const k = Math.floor(at / this.size);
    const b = this.buckets.get(k);
    if (b) b.push(i);
    else this.buckets.set(k, [i]);
  }

  /** Unit `i` no longer lies at `at`. */
  take(i: number, at: number): void {
    const k = Math.floor(at / this.size);
    const b = this.buckets.get(k);
    const j = b ? b.indexOf(i) : -1;
    if (j < 0) return;
    b!.splice(j, 1);
    if (b!.length === 0) this.buckets.delete(k);
  }

  /** Units sharing a byte with [start, start+length), lowest place first; `host[i]`: where unit i lies. */
  within(start: number, length: number, host: readonly number[]): number[] {
    const out: number[] = [];
    const end = start + length;
    for (let k = Math.floor(start / this.size) - 1; k <= Math.floor((end - 1) / this.size); k++) {
      for (const i of this.buckets.get(k) ?? []) {
        if (host[i]! < end && host[i]! + this.units[i]!.length > start) out.push(i);
      }
    }
    return out.sort((a, b) => host[a]! - host[b]!);
  }
}

/** Where each unit lies after the plan (for the expected mapping and the commit's reads). */
export function finalHosts(units: Unit[], plan: RelocationPlan): number[] {
  const host = units.map((u) => u.host);
  for (const round of plan.rounds) for (const s of round) host[s.unit] = s.to;
  return host;
}

const COPY_RUN = 8 << 20;

/**
 * A round's steps as copy runs of at most COPY_RUN bytes: units whose destinations continue each other
 * as one gathered run (one buffer, one write; the sources read in parallel), neighbouring sources in it
 * as one read.
 */
function copyRuns(round: Step[]): GatherRun[] {
  return gatherRuns(
    round.map((s) => ({ from: s.from, to: s.to, length: s.length })),
    COPY_RUN,
  );
}

/**
 * Runs the plan: per round, copy every unit (neighbouring units as one run; src/blockdev/copy.ts) →
 * flush → write every pointer (neighbouring entries as one buffer) → flush → punch the old places,
 * widened to whole file system blocks where the rest of the block reads zeros (blockPunches). Only
 * then are the old places reused, by a later round. `afterRound(r)`: round r's punches are done.
 */
export async function executeRelocation(
  dev: BlockDevice,
  units: Unit[],
  plan: RelocationPlan,
  onBytes: (done: number) => void,
  signal?: AbortSignal,
  afterRound?: (round: number) => Promise<void> | void,
): Promise<void> {
  const rounds = plan.rounds.map(copyRuns);
  const copier = await FreeSpaceCopier.open(dev, rounds.reduce((m, runs) => runs.reduce((n, r) => Math.max(n, r.length), m), 0));
  const block = new Uint8Array(HOLE_BLOCK);
  let done = 0;
  for (let r = 0; r < plan.rounds.length; r++) {
    const round = plan.rounds[r]!;
    // Into free space, as sparse as the source: zero blocks become (or stay) holes.
    await copier.copy(rounds[r]!, (n) => onBytes((done += n)), signal);
    await dev.flush();
    const pointers = round
      .flatMap((s) => {
        const p = units[s.unit]!.pointer;
        const bytes = p.encode(s.to);
        return p.mirror === undefined ? [{ offset: p.offset, bytes }] : [{ offset: p.offset, bytes }, { offset: p.mirror, bytes }];
      })
      .sort((a, b) => a.offset - b.offset);
    for (const w of coalesce(pointers)) {
      await dev.write(w.bytes, w.offset);
      copier.wrote(w.offset, w.bytes.length);
    }
    await dev.flush();
    // Nothing references the old places now: give their space back so the disk never holds more than
    // a round's worth of second copies. Neighbouring old places go as one punch; the parts the next
    // round copies into are left out: its copy overwrites them (and punches its zero blocks), so
    // punching them first would only free blocks the next writes allocate again (a shift chain
    // moves data into the places the round before left).
    const old = new IntervalSet();
    for (const s of round) old.add(s.from, s.length);
    const next = new IntervalSet();
    for (const s of plan.rounds[r + 1] ?? []) {
      old.remove(s.to, s.length);
      next.add(s.to, s.length);
    }
    for (const g of await blockPunches(dev, copier.size, old.ranges(), next, block)) await copier.punch(g.start, g.length);
    await afterRound?.(r);
  }
}

/**
 * A round's old places (`old`: sorted, disjoint, unreferenced now) as punches that free whole file
 * system blocks. A punch of part of a block zeroes those bytes but frees nothing: units smaller than
 * the block (512-byte grains) leave every block at the edge of a run allocated, and a block whose parts
 * are vacated in different rounds is never freed before reclaim — the disk grew by those blocks
 * round after round (VMDK with 512-byte aligned grains → QED, 64 MiB: 14.0 MiB measured where the plan
 * says 8.1). So a block at the edge of an old place is punched whole when every byte of it outside the
 * round's old places reads zeros (or lies past the end of the file) and the next round copies into none
 * of it. Such bytes are what an earlier round's partial punch left (it zeroed them), space the source
 * itself left punched (the tables a first step gave up), or zeros of anything else: the whole-block punch
 * changes no byte that is not an old place, so whatever references them — a live unit, the source's
 * tables, a destination already written — reads the same, and the file stays a valid source at every
 * instant. Blocks the next round copies into are left for its copy, as the old places are.
 * `fileSize`: the device's length (or more); `buf`: a HOLE_BLOCK buffer.
 */
async function blockPunches(dev: BlockDevice, fileSize: number, old: { start: number; length: number }[], next: IntervalSet, buf: Uint8Array): Promise<{ start: number; length: number }[]> {
  const out = new IntervalSet();
  const checked = new Map<number, boolean>();
  // Whether block `b`, which old[k] shares, may be punched whole.
  const wholeFree = async (b: number, k: number): Promise<boolean> => {
    const known = checked.get(b);
    if (known !== undefined) return known;
    let free = !next.intersects(b, HOLE_BLOCK);
    const end = Math.min(b + HOLE_BLOCK, fileSize);
    if (free && end > b) {
      let got = 0;
      while (got < end - b) {
        const n = await dev.read(buf.subarray(got, end - b), b + got);
        if (n === 0) break;
        got += n;
      }
      buf.fill(0, got, end - b);
      // The parts of the block outside every old place: old[k]'s neighbours may share the block too.
      let j = k;
      while (j > 0 && old[j - 1]!.start + old[j - 1]!.length > b) j--;
      let at = b;
      for (; j < old.length && old[j]!.start < end && free; j++) {
        const s = Math.max(old[j]!.start, b);
        if (s > at) free = isZeroRange(buf, at - b, s - b);
        at = Math.max(at, old[j]!.start + old[j]!.length);
      }
      if (free && at < end) free = isZeroRange(buf, at - b, end - b);
    }
    checked.set(b, free);
    return free;
  };
  for (let k = 0; k < old.length; k++) {
    const g = old[k]!;
    const end = g.start + g.length;
    out.add(g.start, g.length);
    const first = g.start - (g.start % HOLE_BLOCK);
    const last = end - 1 - ((end - 1) % HOLE_BLOCK);
    if (g.start % HOLE_BLOCK !== 0 && (await wholeFree(first, k))) out.add(first, HOLE_BLOCK);
    if (end % HOLE_BLOCK !== 0 && (await wholeFree(last, k))) out.add(last, HOLE_BLOCK);
  }
  return out.ranges();
}

/** Neighbouring writes as one buffer. */
export function coalesce(writes: { offset: number; bytes: Uint8Array }[]): { offset: number; bytes: Uint8Array }[] {
  const out: { offset: number; bytes: Uint8Array }[] = [];
  let run: { offset: number; parts: Uint8Array[]; length: number } | undefined;
  const flush = () => {
    if (!run) return;
    const bytes = new Uint8Array(run.length);
    let p = 0;
    for (const part of run.parts) {
      bytes.set(part, p);
      p += part.length;
    }
    out.push({ offset: run.offset, bytes });
  };
  for (const w of writes) {
    if (run && run.offset + run.length === w.offset) {
      run.parts.push(w.bytes);
      run.length += w.bytes.length;
    } else {
      flush();
      run = { offset: w.offset, parts: [w.bytes], length: w.bytes.length };
    }
  }
  flush();
  return out;
}

/** Scratch starts past everything, aligned for the source's units. */
export function scratchBaseFor(ends: number[], alignment: number): number {
  // A loop, not Math.max(...ends): a spread of one argument per unit overflows the stack (2 M VMDK grains).
  let end = -Infinity;
  for (const e of ends) if (e > end) end = e;
  return alignUp(end, Math.max(alignment, 1 << 20));
}

/** A range of guest data a (non-identity) target needs at another host offset, and where it goes. */
export interface MoveTarget {
  guest: number;
  length: number;
  to: number;
  /** Host bytes reserved for the move from `to` on (≥ length: a partial last VHD block owns a whole block). */
  room: number;
}

/**
 * Moves for a target that is not identity placement (VHD dynamic: a block needs its bitmap sector in
 * front of it), done inside the source the way identity targets relocate: every data unit of the source
 * inside a move goes to move.to + (unit.guest − move.guest). The destinations were allocated in space
 * no live structure uses, so nothing stands in the way: the rounds are the steps in guest order, each at
 * most `window` bytes (at least one unit), and no unit is evicted. Undefined when the source's units do
 * not fit the moves exactly (a unit straddling a move's edge or misaligned for the source, data that no
 * unit covers): the caller then copies the moves before the commit instead.
 */
export function planMoveRelocation(units: Unit[], moves: MoveTarget[], dataRuns: { guest: number; length: number; host: number }[], alignment: number, window: number): { units: Unit[]; plan: RelocationPlan } | undefined {
  const sorted = moves.slice().sort((a, b) => a.guest - b.guest);
  const find = (g: number): MoveTarget | undefined => {
    let lo = 0;
    let hi = sorted.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const m = sorted[mid]!;
      if (g < m.guest) hi = mid - 1;
      else if (g >= m.guest + m.length) lo = mid + 1;
      else return m;
    }
    return undefined;
  };
  const chosen: Unit[] = [];
  const steps: Step[] = [];
  for (const u of units) {
    const m = find(u.guest);
    if (!m) continue;
    const to = m.to + (u.guest - m.guest);
    if (u.guest - m.guest + u.length > m.room || to % alignment !== 0) return undefined;
    steps.push({ unit: chosen.length, from: u.host, to, length: u.length, kind: 'place' });
    chosen.push(u);
  }
  // Every data byte inside the moves must belong to a chosen unit that says the same host.
  let need = 0;
  for (const r of dataRuns) need += r.length;
  let covered = 0;
  const byGuest = chosen.map((u, i) => ({ u, i })).sort((a, b) => a.u.guest - b.u.guest);
  let k = 0;
  for (const r of dataRuns.slice().sort((a, b) => a.guest - b.guest)) {
    while (k < byGuest.length && byGuest[k]!.u.guest + byGuest[k]!.u.length <= r.guest) k++;
    for (let j = k; j < byGuest.length && byGuest[j]!.u.guest < r.guest + r.length; j++) {
      const u = byGuest[j]!.u;
      const start = Math.max(u.guest, r.guest);
      const end = Math.min(u.guest + u.length, r.guest + r.length);
      if (u.host + (start - u.guest) !== r.host + (start - r.guest)) return undefined;
      covered += end - start;
    }
  }
  if (covered !== need) return undefined;
  steps.sort((a, b) => chosen[a.unit]!.guest - chosen[b.unit]!.guest);
  const rounds: Step[][] = [];
  let round: Step[] = [];
  let bytes = 0;
  for (const s of steps) {
    if (round.length > 0 && bytes + s.length > window) {
      rounds.push(round);
      round = [];
      bytes = 0;
    }
    round.push(s);
    bytes += s.length;
  }
  if (round.length > 0) rounds.push(round);
  const movedBytes = steps.reduce((s, x) => s + x.length, 0);
  const largestRound = rounds.reduce((m, r) => Math.max(m, r.reduce((s, x) => s + x.length, 0)), 0);
  const scratchEnd = steps.reduce((m, s) => Math.max(m, s.to + s.length), 0);
  return { units: chosen, plan: { rounds, movedBytes, largestRound, scratchPeak: 0, scratchEnd, parked: [], placed: steps.map((s) => s.unit) } };
}
