/**
 * The batch manifest: a JSON-lines record of each image's state, appended as the run goes. Each
 * record is one line written with one write call and made durable (fsync) before the run moves on,
 * so after a crash or kill the file holds every record up to the last one acknowledged, and at
 * most a torn last line, which reading ignores. An image's state is its last record.
 *
 * The manifest is not an image, so it does not go through BlockDevice; its file access goes
 * through the small ManifestIo interface instead, which tests replace with an in-memory fake.
 */
import { open as fsOpen, readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { IoError, UsageError } from '../errors.js';

/** Manifest line format version; readers refuse records of a version they do not know. */
export const MANIFEST_VERSION = 1;

export type ManifestState = 'pending' | 'recovering' | 'converting' | 'done' | 'refused' | 'failed' | 'needs-recover';
export const MANIFEST_STATES: readonly ManifestState[] = ['pending', 'recovering', 'converting', 'done', 'refused', 'failed', 'needs-recover'];

export interface ManifestRecord {
  v: typeof MANIFEST_VERSION;
  /** The image's real path (symlinks resolved): the key that matches records across runs. */
  image: string;
  /** The path as the user named it, for messages. */
  given: string;
  state: ManifestState;
  /** Target format of the run that wrote the record. */
  to: string;
  /** ISO 8601 time the record was written. */
  at: string;
  /** Source format, once known. */
  from?: string;
  /** Why the image was refused, failed, needs recovery or is pending again (cancelled). */
  reason?: string;
  /** done: "converted", or why nothing had to be done (already in the target format). */
  note?: string;
  elapsedMs?: number;
  metadataBytes?: number;
  dataBytes?: number;
  compactionBytes?: number;
}

const OPTIONAL_STRINGS = ['from', 'reason', 'note'] as const;
const OPTIONAL_COUNTS = ['elapsedMs', 'metadataBytes', 'dataBytes', 'compactionBytes'] as const;

export function encodeManifestRecord(r: ManifestRecord): string {
  const line = JSON.stringify(r);
  // JSON.stringify escapes control characters, so a record is always exactly one line.
  return line + '\n';
}

/** Parses one line; throws a UsageError naming the field when it is not a manifest record. */
export function decodeManifestRecord(line: string, where = 'manifest line'): ManifestRecord {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new UsageError(`${where}: not JSON: ${line.slice(0, 80)}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new UsageError(`${where}: not a JSON object`);
  const o = v as Record<string, unknown>;
  const bad = (field: string) => new UsageError(`${where}: field ${field} = ${JSON.stringify(o[field])} is not valid in an imgconv manifest record`);
  if (o.v !== MANIFEST_VERSION) throw bad('v');
  for (const f of ['image', 'given', 'to', 'at'] as const) if (typeof o[f] !== 'string' || o[f] === '') throw bad(f);
  if (!MANIFEST_STATES.includes(o.state as ManifestState)) throw bad('state');
  for (const f of OPTIONAL_STRINGS) if (o[f] !== undefined && typeof o[f] !== 'string') throw bad(f);
  for (const f of OPTIONAL_COUNTS) if (o[f] !== undefined && !(Number.isSafeInteger(o[f]) && (o[f] as number) >= 0)) throw bad(f);
  const r: ManifestRecord = { v: MANIFEST_VERSION, image: o.image as string, given: o.given as string, state: o.state as ManifestState, to: o.to as string, at: o.at as string };
  for (const f of OPTIONAL_STRINGS) if (o[f] !== undefined) r[f] = o[f] as string;
  for (const f of OPTIONAL_COUNTS) if (o[f] !== undefined) r[f] = o[f] as number;
  return r;
}

export interface ParsedManifest {
  records: ManifestRecord[];
  /** Bytes of whole lines; anything after them is a torn last line. */
  validBytes: number;
  /** The torn last line's bytes (0 when the file ends with a newline). */
  tornBytes: number;
}

/**
 * Every complete line must be a record: appends are fsynced one by one, so only the last line can
 * be incomplete after a crash. A bad line before it means the file was edited or is not a
 * manifest, and the run refuses rather than guess which images are done.
 */
export function parseManifest(text: string, name = 'manifest'): ParsedManifest {
  const bytes = Buffer.from(text, 'utf8');
  const lastNewline = bytes.lastIndexOf(0x0a);
  const validBytes = lastNewline + 1;
  const body = bytes.subarray(0, validBytes).toString('utf8');
  const records: ManifestRecord[] = [];
  const lines = body.split('\n');
  lines.pop(); // the empty string after the final newline
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    records.push(decodeManifestRecord(line, `${name} line ${i + 1}`));
  });
  return { records, validBytes, tornBytes: bytes.length - validBytes };
}

/** Each image's last record, by real path, in the order images first appear. */
export function latestStates(records: readonly ManifestRecord[]): Map<string, ManifestRecord> {
  const out = new Map<string, ManifestRecord>();
  // Map.set on an existing key keeps its first position and replaces the value.
  for (const r of records) out.set(r.image, r);
  return out;
}

/** What the manifest needs from the file system. */
export interface ManifestIo {
  /** The file's text, or undefined when it does not exist. */
  read(path: string): Promise<string | undefined>;
  /**
   * Opens the file for appending, creating it when missing (its directory is then fsynced so the
   * new name survives a crash). When `keepBytes` is given the file is first cut to that length (a
   * torn last line is dropped, so the next record starts on a line of its own) and fsynced.
   */
  openAppend(path: string, keepBytes?: number): Promise<ManifestAppender>;
}

export interface ManifestAppender {
  /** Writes the text with one write at the end of the file, then fsyncs the file. */
  append(text: string): Promise<void>;
  close(): Promise<void>;
}

function ioErr(op: string, path: string, e: unknown): IoError {
  const err = e as NodeJS.ErrnoException;
  return new IoError(op, path, 0, err.code, err.message ?? String(e));
}

async function syncDirectory(path: string): Promise<void> {
  const dir = dirname(path);
  try {
    const fh = await fsOpen(dir, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  } catch (e) {
    // Some filesystems refuse fsync on a directory; nothing more can be done there.
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EINVAL' && code !== 'EISDIR' && code !== 'EBADF') throw ioErr('fsync directory', dir, e);
  }
}

/** The real file system: O_APPEND writes, fsync per record, directory fsync on creation. */
export const fileManifestIo: ManifestIo = {
  async read(path) {
    try {
      return await readFile(path, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw ioErr('read', path, e);
    }
  },
  async openAppend(path, keepBytes) {
    let created = false;
    let fh;
    try {
      fh = await fsOpen(path, 'ax');
      created = true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw ioErr('create', path, e);
      try {
        fh = await fsOpen(path, 'a');
      } catch (e2) {
        throw ioErr('open', path, e2);
      }
    }
    try {
      if (created) await syncDirectory(path);
      if (keepBytes !== undefined && (await fh.stat()).size > keepBytes) {
        await fh.truncate(keepBytes);
        await fh.sync();
      }
    } catch (e) {
      await fh.close().catch(() => {});
      throw ioErr('prepare', path, e);
    }
    const handle = fh;
    return {
      async append(text) {
        try {
          const buf = Buffer.from(text, 'utf8');
          // O_APPEND: the write lands at the end whatever the offset argument says.
          let done = 0;
          while (done < buf.length) done += (await handle.write(buf, done, buf.length - done)).bytesWritten;
          await handle.sync();
        } catch (e) {
          throw ioErr('append', path, e);
        }
      },
      close: () => handle.close(),
    };
  },
};

/**
 * A manifest open for a run: the records read at the start and a writer that appends one record
 * at a time, in call order, each durable before its promise resolves.
 */
export class Manifest {
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    readonly path: string,
    readonly previous: ManifestRecord[],
    readonly tornBytes: number,
    private readonly appender: ManifestAppender,
  ) {}

  static async open(path: string, io: ManifestIo = fileManifestIo): Promise<Manifest> {
    const text = await io.read(path);
    const parsed = text === undefined ? { records: [], validBytes: 0, tornBytes: 0 } : parseManifest(text, path);
    const appender = await io.openAppend(path, parsed.tornBytes > 0 ? parsed.validBytes : undefined);
    return new Manifest(path, parsed.records, parsed.tornBytes, appender);
  }

  /** Each image's state when the run began (its last record). */
  latest(): Map<string, ManifestRecord> {
    return latestStates(this.previous);
  }

  /** Appends the records (one write, one fsync); resolves once they are durable. */
  write(...records: ManifestRecord[]): Promise<void> {
    if (records.length === 0) return this.queue;
    if (this.closed) return Promise.reject(new Error(`manifest ${this.path} is closed`));
    const text = records.map(encodeManifestRecord).join('');
    const next = this.queue.then(() => this.appender.append(text));
    // A failed append fails its caller; later appends still run (each is whole lines).
    this.queue = next.catch(() => {});
    return next;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue;
    await this.appender.close();
  }
}

/** Reads a manifest without opening it for writing (dry runs, reports). */
export async function readManifest(path: string, io: ManifestIo = fileManifestIo): Promise<ManifestRecord[]> {
  const text = await io.read(path);
  return text === undefined ? [] : parseManifest(text, path).records;
}
