/**
 * The conversion journal: an append-only sidecar file `<image>.imgconv-journal`, a sequence of
 * self-checksummed records. Decoding stops at the first record that is torn or fails its checksum, so
 * a crash while appending leaves exactly the records completed before it. See DESIGN.md, "Commit
 * protocol": PREPARE (undo bytes, original length) is made durable before the image is touched; the
 * durable COMMIT record (redo bytes of the fixed regions) is the commit point; DONE marks the end.
 *
 * Records whose meaning depends on an optional field say so in their `features` list (the encoder
 * derives it from the fields, see `featuresOf`). A reader refuses a journal naming a feature it does not
 * understand (`requireUnderstood`): a build that ignored such a field would recover the wrong way — an
 * adoption's PREPARE taken for a plain one truncates the adopted disk to the metadata file's length.
 */
import { createHash } from 'node:crypto';
import { ImgconvError } from '../errors.js';
import { VERSION } from '../version.js';

export const JOURNAL_SUFFIX = '.imgconv-journal';
const MAGIC = Buffer.from('IMGCJREC', 'latin1');
const HEADER_BYTES = 8 + 4 + 4 + 8; // magic, type, json length, binary length
const DIGEST_BYTES = 32;
/**
 * Bounds what a hostile or corrupt journal can make us allocate. A record the encoder would make
 * beyond them is refused when it is written (the PREPARE record before the image is touched), never
 * written to be ignored on recovery.
 */
export const MAX_JSON = 64 << 20;
export const MAX_BINARY = 256 << 20;

export class JournalTooLargeError extends ImgconvError {}

export function journalPath(imagePath: string): string {
  return imagePath + JOURNAL_SUFFIX;
}

/** Bytes of the image at a fixed offset. */
export interface Region {
  offset: number;
  bytes: Uint8Array;
}

/**
 * The features of the journal format this build understands: each names optional fields that change
 * what recovery must do with the image, so a reader that ignored them would act wrongly. Informational
 * fields (digests, sizes for messages) are not features. A later build adds a name here for every such
 * field, and for a new record type (named by the PREPARE that precedes it), so this build refuses them.
 */
export const UNDERSTOOD_FEATURES = [
  /** PREPARE `relocating`, COMMIT `undo`/`undoLength`: data moved inside the source, never truncate on rollback. */
  'relocating',
  /** PREPARE `then`: a second step follows, appending its own PREPARE to this journal. */
  'two-step',
  /** PREPARE `plan.adoption`: the commit point is renaming a data file to the image, not a COMMIT record. */
  'adopt-data-file',
  /** PREPARE `plan.identity`: the target maps host = guest; verify as identity, cut scratch past the end. */
  'identity',
  /** PREPARE `plan.holesAsData: false`: file holes stay unallocated in the target; verify so. */
  'holes-unallocated',
  /** COMMIT `companion`: a file beside the image is created at the commit, removed on rollback. */
  'companion',
] as const;
export type JournalFeature = (typeof UNDERSTOOD_FEATURES)[number];

export interface PrepareRecord {
  type: 'prepare';
  /** What a reader must understand to act on this record: derived from the fields by the encoder. */
  features?: string[];
  sourceFormat: string;
  targetFormat: string;
  /** File length before the conversion: rollback truncates back to it. */
  originalLength: number;
  /** SHA-256 of the source's fixed regions as found, to recognise the image on recovery. */
  sourceDigest: string;
  /** The old bytes of every region the commit overwrites in place. */
  undo: Region[];
  /**
   * The plan summary, for messages. `relocationWindow`: the `--move-window` the conversion ran with (written
   * only when one was given), so that recovery's reclaim, compaction and second step keep the same bound
   * on extra space. Not a journal feature: a reader that ignores it recovers correctly with its default
   * window (only the peak space differs, never what recovery does with the image's bytes).
   */
  plan: Record<string, unknown> & { relocationWindow?: number };
  /**
   * Data is relocated inside the source before the commit (src/engine/relocate.ts): every step keeps
   * the file a valid source image, so there is nothing to undo before the commit — and the file must
   * not be truncated, since relocated data may lie past the original end. The undo bytes, read just
   * before the commit, travel in the COMMIT record.
   */
  relocating?: boolean;
  /** Two-step conversions: the final target (and its options) that a second step converts to after this one. */
  then?: { to: string; options: Record<string, string> };
}

export interface CommitRecord {
  type: 'commit';
  features?: string[];
  /** The new bytes of every fixed region, written in place after this record is durable. */
  redo: Region[];
  /** Length the file must have once committed (the target's end), or -1 to leave it. */
  finalLength: number;
  /** Relocating conversions: the old bytes of the redo regions, and the file length, just before the commit. */
  undo?: Region[];
  undoLength?: number;
  /** A file created beside the image at the commit point (VMDK flat descriptor): its path and bytes (base64). */
  companion?: { path: string; data: string };
}

export interface DoneRecord {
  type: 'done';
  features?: string[];
}

/** Verification failed after the commit: the conversion is being undone from the undo bytes. */
export interface AbortRecord {
  type: 'abort';
  reason: string;
  features?: string[];
}

export type JournalRecord = PrepareRecord | CommitRecord | DoneRecord | AbortRecord;

const TYPE_CODES = { prepare: 1, commit: 2, done: 3, abort: 4 } as const;
const CODE_TYPES: Record<number, JournalRecord['type']> = { 1: 'prepare', 2: 'commit', 3: 'done', 4: 'abort' };

export function regionsDigest(regions: Region[]): string {
  const h = createHash('sha256');
  for (const r of regions) {
    h.update(`${r.offset}:${r.bytes.length};`);
    h.update(r.bytes);
  }
  return h.digest('hex');
}

/**
 * The features a record's fields need: the list the encoder writes (with any the caller named), sorted.
 * Derived here, not by the callers, so that no record that needs a feature is ever written without it.
 */
export function featuresOf(rec: JournalRecord): string[] {
  const out = new Set<string>(rec.features ?? []);
  if (rec.type === 'prepare') {
    if (rec.relocating) out.add('relocating');
    if (rec.then !== undefined) out.add('two-step');
    if (rec.plan.adoption !== undefined) out.add('adopt-data-file');
    if (rec.plan.identity === true) out.add('identity');
    if (rec.plan.holesAsData === false) out.add('holes-unallocated');
  } else if (rec.type === 'commit') {
    if (rec.undo !== undefined || rec.undoLength !== undefined) out.add('relocating');
    if (rec.companion !== undefined) out.add('companion');
  }
  return [...out].sort();
}

export function encodeRecord(rec: JournalRecord): Uint8Array {
  const regions = rec.type === 'prepare' ? rec.undo : rec.type === 'commit' ? rec.redo : [];
  const second = rec.type === 'commit' ? (rec.undo ?? []) : [];
  const meta: Record<string, unknown> = { ...rec };
  delete meta.undo;
  delete meta.redo;
  delete meta.features;
  const features = featuresOf(rec);
  if (features.length > 0) meta.features = features;
  meta.regions = regions.map((r) => ({ offset: r.offset, length: r.bytes.length }));
  if (rec.type === 'commit' && rec.undo) meta.undoRegions = second.map((r) => ({ offset: r.offset, length: r.bytes.length }));
  const json = Buffer.from(JSON.stringify(meta), 'utf8');
  const binLength = [...regions, ...second].reduce((s, r) => s + r.bytes.length, 0);
  if (json.length > MAX_JSON || binLength > MAX_BINARY) {
    throw new JournalTooLargeError(`a ${rec.type} journal record of ${json.length} + ${binLength} bytes is beyond what recovery reads back (${MAX_JSON} + ${MAX_BINARY}); the conversion is refused before it starts`);
  }
  const out = new Uint8Array(HEADER_BYTES + json.length + binLength + DIGEST_BYTES);
  const dv = new DataView(out.buffer);
  out.set(MAGIC, 0);
  dv.setUint32(8, TYPE_CODES[rec.type], true);
  dv.setUint32(12, json.length, true);
  dv.setBigUint64(16, BigInt(binLength), true);
  out.set(json, HEADER_BYTES);
  let pos = HEADER_BYTES + json.length;
  for (const r of [...regions, ...second]) {
    out.set(r.bytes, pos);
    pos += r.bytes.length;
  }
  out.set(createHash('sha256').update(out.subarray(0, pos)).digest(), pos);
  return out;
}

export interface DecodedJournal {
  records: JournalRecord[];
  /** Bytes covered by valid records; anything after is a torn or corrupt tail. */
  validLength: number;
  /** True when bytes follow the last valid record. */
  tornTail: boolean;
  /**
   * A complete record with a valid checksum but a type code this build does not know: a newer build
   * wrote it. Decoding stops there; it is not a torn tail (recovery must not cut it off).
   */
  unknownType?: number;
}

/** Decodes as many complete, valid records as the bytes hold. Never throws on bad input. */
export function decodeJournal(bytes: Uint8Array): DecodedJournal {
  const records: JournalRecord[] = [];
  let pos = 0;
  for (;;) {
    const rec = decodeOne(bytes, pos);
    if (!rec) break;
    if ('unknownType' in rec) return { records, validLength: pos, tornTail: false, unknownType: rec.unknownType };
    records.push(rec.record);
    pos = rec.end;
  }
  return { records, validLength: pos, tornTail: pos < bytes.length };
}

function decodeOne(bytes: Uint8Array, pos: number): { record: JournalRecord; end: number } | { unknownType: number } | null {
  if (bytes.length - pos < HEADER_BYTES + DIGEST_BYTES) return null;
  if (!Buffer.from(bytes.subarray(pos, pos + 8)).equals(MAGIC)) return null;
  const dv = new DataView(bytes.buffer, bytes.byteOffset + pos);
  const code = dv.getUint32(8, true);
  const type = CODE_TYPES[code];
  const jsonLen = dv.getUint32(12, true);
  const binLenBig = dv.getBigUint64(16, true);
  if (jsonLen > MAX_JSON || binLenBig > BigInt(MAX_BINARY)) return null;
  const binLen = Number(binLenBig);
  const end = pos + HEADER_BYTES + jsonLen + binLen + DIGEST_BYTES;
  if (end > bytes.length) return null;
  const body = bytes.subarray(pos, end - DIGEST_BYTES);
  const digest = createHash('sha256').update(body).digest();
  if (!digest.equals(Buffer.from(bytes.subarray(end - DIGEST_BYTES, end)))) return null;
  if (!type) return { unknownType: code };
  let meta: Record<string, unknown>;
  try {
    meta = JSON.parse(Buffer.from(bytes.subarray(pos + HEADER_BYTES, pos + HEADER_BYTES + jsonLen)).toString('utf8'));
  } catch {
    return null;
  }
  if (meta.type !== type) return null;
  let bin = pos + HEADER_BYTES + jsonLen;
  const take = (layout: unknown): Region[] | null => {
    if (layout !== undefined && !Array.isArray(layout)) return null;
    const out: Region[] = [];
    for (const r of (layout ?? []) as { offset: number; length: number }[]) {
      if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.length < 0 || bin + r.length > end - DIGEST_BYTES) return null;
      out.push({ offset: r.offset, bytes: bytes.slice(bin, bin + r.length) });
      bin += r.length;
    }
    return out;
  };
  const regions = take(meta.regions);
  const undoRegions = meta.undoRegions === undefined ? undefined : take(meta.undoRegions);
  if (!regions || undoRegions === null || bin !== end - DIGEST_BYTES) return null;
  delete meta.regions;
  delete meta.undoRegions;
  const record = (
    type === 'prepare'
      ? { ...meta, undo: regions }
      : type === 'commit'
        ? { ...meta, redo: regions, ...(undoRegions ? { undo: undoRegions } : {}) }
        : meta
  ) as unknown as JournalRecord;
  return { record, end };
}

/**
 * What in a decoded journal this build does not understand: feature names it does not know, a features
 * field that is not a list of names, a record type it does not know. Empty: the journal can be acted on.
 * A journal without features (as written before they existed) names none.
 */
export function notUnderstood(j: DecodedJournal): string[] {
  const known = new Set<string>(UNDERSTOOD_FEATURES);
  const out = new Set<string>();
  for (const r of j.records) {
    const f = (r as { features?: unknown }).features;
    if (f === undefined) continue;
    if (!Array.isArray(f) || f.some((x) => typeof x !== 'string')) {
      out.add(`a ${r.type} record's features field ${JSON.stringify(f)} (not a list of names)`);
      continue;
    }
    for (const name of f as string[]) if (!known.has(name)) out.add(`feature "${name}"`);
  }
  if (j.unknownType !== undefined) out.add(`record type ${j.unknownType}`);
  return [...out];
}

/** The journal needs what this build does not understand; nothing was written. */
export class JournalNotUnderstoodError extends ImgconvError {
  constructor(
    readonly journal: string,
    readonly unknown: string[],
  ) {
    const image = journal.endsWith(JOURNAL_SUFFIX) ? journal.slice(0, -JOURNAL_SUFFIX.length) : journal;
    super(
      `${journal} names ${unknown.join(', ')}, which this imgconv (${VERSION}) does not understand: a newer imgconv wrote this journal, and it must finish the interrupted conversion (run that version's: imgconv recover ${image}). Nothing was changed: ${image} and the journal are as they were`,
    );
  }
}

/**
 * Every reader that acts on a journal calls this before it acts: acting on a record while ignoring a
 * field that changes its meaning can destroy data (see UNDERSTOOD_FEATURES).
 */
export function requireUnderstood(j: DecodedJournal, jpath: string): void {
  const unknown = notUnderstood(j);
  if (unknown.length > 0) throw new JournalNotUnderstoodError(jpath, unknown);
}

/** Where a journal says the conversion stands. */
export type JournalState =
  | { state: 'none' }
  | ({ state: 'prepared'; prepare: PrepareRecord } & Staged)
  | ({ state: 'committed'; prepare: PrepareRecord; commit: CommitRecord } & Staged)
  | ({ state: 'aborted'; prepare: PrepareRecord; reason: string; redo: Region[]; commit?: CommitRecord } & Staged)
  | ({ state: 'done'; prepare: PrepareRecord; commit: CommitRecord } & Staged);

/**
 * A conversion in two steps (through an intermediate format, when the source cannot be relocated in
 * place) appends its second step's records to the same journal: the state is the last step's, and
 * `first` is the first step's PREPARE (the original format).
 */
export interface Staged {
  step: number;
  first: PrepareRecord;
}

/**
 * prepare → (nothing durable in the image changed yet) roll back;
 * prepare+commit → roll forward; +abort → roll back with the undo bytes; +done → only remove the journal.
 */
export function journalState(j: DecodedJournal): JournalState {
  const first = j.records[0];
  if (!first || first.type !== 'prepare') return { state: 'none' };
  let lastPrepare = 0;
  let step = 0;
  j.records.forEach((r, i) => {
    if (r.type === 'prepare') {
      lastPrepare = i;
      step++;
    }
  });
  const [p, c, d] = j.records.slice(lastPrepare) as [PrepareRecord, JournalRecord | undefined, JournalRecord | undefined];
  const staged: Staged = { step, first };
  if (!c) return { state: 'prepared', prepare: p, ...staged };
  if (c.type === 'abort') return { state: 'aborted', prepare: p, reason: c.reason, redo: [], ...staged };
  if (c.type !== 'commit') return { state: 'prepared', prepare: p, ...staged };
  if (d?.type === 'abort') return { state: 'aborted', prepare: p, reason: d.reason, redo: c.redo, commit: c, ...staged };
  if (d?.type === 'done') return { state: 'done', prepare: p, commit: c, ...staged };
  return { state: 'committed', prepare: p, commit: c, ...staged };
}

/** The bytes and length a rollback restores: from the COMMIT record when the conversion relocated data. */
export function undoOf(prepare: PrepareRecord, commit?: CommitRecord): { undo: Region[]; length: number } {
  if (commit?.undo) return { undo: commit.undo, length: commit.undoLength ?? prepare.originalLength };
  return { undo: prepare.undo, length: prepare.originalLength };
}
