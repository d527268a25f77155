/**
 * Streaming import (`unstream`): read a sequentially written image from a pipe and write a normal
 * image or a raw disk. The format's reader parses and checks the stream's head — and refuses a
 * stream whose data does not follow its metadata — before the destination is created; then:
 *   --to raw (an identity format): guest data is written at guest offsets, sparse where the stream
 *     has no data (all-zero pieces are not written either);
 *   --to the stream's own format: the stream's bytes are the image, copied as they come (all-zero
 *     pieces left as holes) while the reader still checks them;
 *   --to any other format: the raw disk, then an in-place conversion of it (src/engine/convert.ts).
 * The destination must not exist; if anything fails once it was created, it is removed (it would be
 * an incomplete image that looks like a whole one).
 */
import { fileStorage, type Storage } from '../blockdev/storage.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { FormatDriver } from '../driver.js';
import { UsageError } from '../errors.js';
import { findDriver, openImage } from '../image.js';
import { convertInPlace, type ConversionReport } from '../engine/convert.js';
import { journalPath } from '../engine/journal.js';
import { StreamInterruptedError } from './export.js';
import { ReadableInput } from './input.js';
import { writeSparse } from '../blockdev/sparse.js';
import type { StreamProgressEvent } from './progress.js';

export interface UnstreamOptions {
  /** Format of the stream. */
  from: string;
  /** Format of the destination. */
  to: string;
  drivers: readonly FormatDriver[];
  storage?: Storage;
  onProgress?: (e: StreamProgressEvent) => void;
  signal?: AbortSignal;
}

export interface UnstreamReport {
  destination: string;
  from: string;
  to: string;
  virtualSize: number;
  /** Bytes read from the stream. */
  streamBytes: number;
  /** Guest bytes the stream carried (written unless all zero). */
  dataBytes: number;
  /** Length of the destination file. */
  fileLength: number;
  /** When the destination was converted in place from the raw disk. */
  conversion?: { metadataBytes: number; dataMovedBytes: number };
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new StreamInterruptedError('interrupted: unstream was stopped (the destination was removed)');
}

export async function unstreamImage(source: AsyncIterable<Uint8Array | string>, dest: string, opts: UnstreamOptions): Promise<UnstreamReport> {
  const storage = opts.storage ?? fileStorage;
  const fromDriver = findDriver(opts.drivers, opts.from);
  const toDriver = findDriver(opts.drivers, opts.to);
  const reader = fromDriver.stream?.reader;
  if (!reader) {
    const can = opts.drivers.filter((d) => d.stream?.reader).map((d) => d.name);
    throw new UsageError(`${fromDriver.name} streams cannot be read (readable: ${can.join(', ')})`);
  }
  const identity = opts.drivers.find((d) => d.stream?.identity);
  if (!identity) throw new Error('unstream: no identity (raw) driver registered');
  const copy = toDriver === fromDriver && !toDriver.stream?.identity;
  const viaRaw = !copy && toDriver !== identity;
  if (viaRaw && !toDriver.target) {
    throw new UsageError(`unstream --to ${toDriver.name}: a ${toDriver.name} image can be made only as a copy of a ${toDriver.name} stream (--from ${toDriver.name}) or from a raw disk in place, which ${toDriver.name} does not support yet`);
  }
  if (await storage.exists(dest)) throw new UsageError(`${dest} exists; unstream writes only new files`);

  const input = new ReadableInput(source, `${fromDriver.name} stream`);
  // A copy keeps what the reader consumes before the destination exists (the metadata) to write it first.
  const prefix: { offset: number; bytes: Uint8Array }[] = [];
  if (copy) input.tap = async (offset, bytes) => void prefix.push({ offset, bytes: bytes.slice() });
  opts.onProgress?.({ phase: 'head', bytesDone: 0, bytesTotal: 1 });
  const head = await reader.readHead(input);
  checkAborted(opts.signal);
  opts.onProgress?.({ phase: 'head', bytesDone: 1, bytesTotal: 1 });

  const dev = await storage.create(dest);
  let ok = false;
  try {
    if (copy) {
      for (const p of prefix) await writeSparse(dev, p.offset, p.bytes);
      prefix.length = 0;
      input.tap = (offset, bytes) => writeSparse(dev, offset, bytes);
    } else if (head.virtualSize !== undefined) {
      await dev.truncate(head.virtualSize);
    }
    // Progress: guest bytes out of what the head announced; else how far into the disk the data reached.
    const total = head.dataBytes ?? head.virtualSize ?? 0;
    let done = 0;
    let reached = 0;
    opts.onProgress?.({ phase: 'write', bytesDone: 0, bytesTotal: total });
    const virtualSize = await head.readData(input, async (guest, bytes) => {
      checkAborted(opts.signal);
      if (!copy) await writeSparse(dev, guest, bytes);
      done += bytes.length;
      reached = Math.max(reached, guest + bytes.length);
      const shown = head.dataBytes !== undefined ? done : reached;
      opts.onProgress?.({ phase: 'write', bytesDone: shown, bytesTotal: Math.max(total, shown) });
    });
    // Whatever follows the image (padding, a tar trailer) is read, so the writer never sees a broken pipe.
    await input.drain();
    const length = copy ? input.position : virtualSize;
    if ((await dev.size()) !== length) await dev.truncate(length);
    await dev.flush();
    await dev.close();
    let conversion: UnstreamReport['conversion'];
    if (viaRaw) {
      opts.onProgress?.({ phase: 'convert', bytesDone: 0, bytesTotal: 1 });
      const r: ConversionReport = await convertInPlace(dest, { to: toDriver.name, format: identity.name, drivers: opts.drivers, storage });
      conversion = { metadataBytes: r.written.metadataBytes, dataMovedBytes: r.written.dataBytes };
      opts.onProgress?.({ phase: 'convert', bytesDone: 1, bytesTotal: 1 });
    }
    // The destination must open as what was asked, with the stream's size.
    const chain = await openImage(dest, { drivers: opts.drivers, format: toDriver.name, backing: false });
    let fileLength: number;
    try {
      const got = chain.layers[0]!.info.virtualSize;
      // raw rounds a length that is not a multiple of 512 up, as QEMU does.
      if (got !== virtualSize && !(toDriver === identity && got === Math.ceil(virtualSize / 512) * 512)) {
        throw new Error(`unstream: ${dest} opens with virtual size ${got}, the stream said ${virtualSize}`);
      }
      fileLength = await chain.layers[0]!.dev.size();
    } finally {
      await chain.close();
    }
    ok = true;
    return {
      destination: dest,
      from: fromDriver.name,
      to: toDriver.name,
      virtualSize,
      streamBytes: input.position,
      dataBytes: done,
      fileLength,
      ...(conversion ? { conversion } : {}),
    };
  } finally {
    if (!ok) {
      await closeQuietly(dev);
      await storage.remove(dest);
      // A failed in-place step may leave its journal; without the image it means nothing.
      await storage.remove(journalPath(dest));
    }
  }
}

async function closeQuietly(dev: BlockDevice): Promise<void> {
  try {
    await dev.close();
  } catch {
    // already closed
  }
}
