/**
 * Streaming export and measure: open the source with its whole backing chain, collapse the chain
 * into one view of guest data (DataRuns), let the target lay the image out (pass one), then write it
 * in file order (pass two) into a sink — stdout, optionally inside a one-member tar stream. The
 * source is only read: whatever happens, it is left as it was.
 */
import { basename, extname } from 'node:path';
import type { DeviceOpener } from '../blockdev/types.js';
import type { FormatDriver, TargetOptions } from '../driver.js';
import { ImgconvError, UsageError } from '../errors.js';
import { GuestReader } from '../guest.js';
import { findDriver, openImage, type ImageChain } from '../image.js';
import { DataRuns } from './collapse.js';
import type { StreamProgressEvent } from './progress.js';
import { CoalescingSink, CountingSink } from './sink.js';
import { tarHeader, tarLength, tarTrailerLength } from './tar.js';
import type { GuestSource, StreamLayout, StreamSink } from './types.js';

export interface ExportOptions {
  /** Target format. */
  to: string;
  options?: TargetOptions;
  /** Source format (skips probing). */
  format?: string;
  drivers: readonly FormatDriver[];
  /** Wrap the image as this member of a one-member tar stream. */
  tar?: string;
  /** Base name of the output file (VMDK's extent line); default: the tar member, else the source's stem + target name. */
  fileName?: string;
  opener?: DeviceOpener;
  onProgress?: (e: StreamProgressEvent) => void;
  /** Stops the stream at the next read or write (the source is untouched either way). */
  signal?: AbortSignal;
}

export class StreamInterruptedError extends ImgconvError {}

/** Everything pass one decides, with the chain still open for pass two. */
export interface PreparedExport {
  image: string;
  chain: ImageChain;
  source: { format: string; virtualSize: number; layers: number; dataBytes: number };
  layout: StreamLayout;
  /** Things the stream does not carry or that the user should know (listed by the CLI). */
  warnings: string[];
  close(): Promise<void>;
}

export interface MeasureReport {
  image: string;
  source: PreparedExport['source'];
  target: { format: string; parameters: StreamLayout['parameters'] };
  /** Exact bytes `stream` writes with these options (the tar stream's length with --tar). */
  required: number;
  /** The same with every cluster allocated (compressed formats: with data that does not compress). */
  fullyAllocated: number;
  /** With --tar: the member name and the image's own sizes inside it. */
  tar?: { name: string; imageRequired: number; imageFullyAllocated: number };
  warnings: string[];
}

export interface ExportReport {
  image: string;
  source: PreparedExport['source'];
  target: { format: string; parameters: StreamLayout['parameters'] };
  /** Bytes of the image written (the tar member's size with --tar). */
  imageBytes: number;
  /** Bytes written in all (tar header and trailer included). */
  bytes: number;
  /** Guest bytes read from the source. */
  dataBytes: number;
  tar?: { name: string };
  warnings: string[];
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new StreamInterruptedError('interrupted: the stream was stopped (the output is incomplete; the source was not changed)');
}

function streamTargetOf(drivers: readonly FormatDriver[], to: string): NonNullable<FormatDriver['stream']> {
  const d = findDriver(drivers, to);
  if (!d.stream) {
    const can = drivers.filter((x) => x.stream).map((x) => x.name);
    throw new UsageError(`${d.name} cannot be written as a stream (streamable: ${can.join(', ')})`);
  }
  return d.stream;
}

/** Pass one: open, collapse, lay out. The caller closes the result. */
export async function prepareExport(path: string, opts: ExportOptions): Promise<PreparedExport> {
  const target = streamTargetOf(opts.drivers, opts.to);
  const targetName = findDriver(opts.drivers, opts.to).name;
  const chain = await openImage(path, { drivers: opts.drivers, ...(opts.format ? { format: opts.format } : {}), ...(opts.opener ? { opener: opts.opener } : {}) });
  try {
    const maps = [];
    for (const layer of chain.layers) maps.push(await layer.mapping());
    const data = DataRuns.fromChain(maps);
    const top = chain.layers[0]!;
    const warnings: string[] = [];
    for (const [i, layer] of chain.layers.entries()) {
      const where = i === 0 ? path : `backing file ${chain.paths[i]}`;
      for (const n of layer.info.notCarried ?? []) warnings.push(`${where}: ${n.feature} not carried (${n.detail})`);
      if (layer.info.dirty) warnings.push(`${where}: marked dirty (not closed cleanly); its tables are read as they are`);
      if (layer.info.corrupt) warnings.push(`${where}: marked corrupt; check it with qemu-img check`);
    }
    const fileName = opts.fileName ?? opts.tar ?? `${basename(path, extname(path))}.${targetName}`;
    const layout = target.layout({ virtualSize: top.info.virtualSize, data, options: opts.options ?? {}, fileName });
    return {
      image: path,
      chain,
      source: { format: top.format, virtualSize: top.info.virtualSize, layers: chain.layers.length, dataBytes: data.bytes },
      layout,
      warnings,
      close: () => chain.close(),
    };
  } catch (e) {
    await chain.close();
    throw e;
  }
}

/** The collapsed guest, counting what is read and honouring the abort signal. */
async function guestSource(chain: ImageChain, signal: AbortSignal | undefined, onRead: (n: number) => void): Promise<GuestSource> {
  const reader = await GuestReader.create(chain);
  return {
    async read(offset, length) {
      checkAborted(signal);
      const bytes = await reader.read(offset, length);
      onRead(length);
      return bytes;
    },
  };
}

/** Counts bytes into progress events and checks the abort signal on every write. */
class ProgressSink implements StreamSink {
  constructor(
    private readonly inner: StreamSink,
    private readonly onWrite: () => void,
    private readonly signal: AbortSignal | undefined,
  ) {}
  get position(): number {
    return this.inner.position;
  }
  async write(bytes: Uint8Array): Promise<void> {
    checkAborted(this.signal);
    await this.inner.write(bytes);
    this.onWrite();
  }
  async zeros(length: number): Promise<void> {
    checkAborted(this.signal);
    await this.inner.zeros(length);
    this.onWrite();
  }
}

/** The image's exact size: from the layout, or by running pass two into a counter (compressed formats). */
async function measuredSize(p: PreparedExport, opts: ExportOptions): Promise<number> {
  if (p.layout.size !== undefined) return p.layout.size;
  const total = p.layout.readBytes;
  let read = 0;
  opts.onProgress?.({ phase: 'measure', bytesDone: 0, bytesTotal: total });
  const source = await guestSource(p.chain, opts.signal, (n) => {
    read = Math.min(total, read + n);
    opts.onProgress?.({ phase: 'measure', bytesDone: read, bytesTotal: total });
  });
  const counter = new CountingSink();
  await p.layout.write(source, counter);
  return counter.position;
}

export async function measureExport(path: string, opts: ExportOptions): Promise<MeasureReport> {
  const p = await prepareExport(path, opts);
  try {
    const image = await measuredSize(p, opts);
    const full = p.layout.fullyAllocated;
    const report: MeasureReport = {
      image: path,
      source: p.source,
      target: { format: p.layout.format, parameters: p.layout.parameters },
      required: opts.tar ? tarLength(opts.tar, image) : image,
      fullyAllocated: opts.tar ? tarLength(opts.tar, full) : full,
      warnings: p.warnings,
    };
    if (opts.tar) report.tar = { name: opts.tar, imageRequired: image, imageFullyAllocated: full };
    return report;
  } finally {
    await p.close();
  }
}

/**
 * Writes the image (in a tar stream with `opts.tar`) into `sink`, strictly in order. Emits `map`,
 * then `measure` when the size must be known first and depends on the data, then `write`.
 */
export async function streamExport(path: string, sink: StreamSink, opts: ExportOptions): Promise<ExportReport> {
  // Refusals that need no image come before the first progress event.
  if (opts.tar) tarHeader(opts.tar, 0);
  streamTargetOf(opts.drivers, opts.to);
  opts.onProgress?.({ phase: 'map', bytesDone: 0, bytesTotal: 1 });
  const p = await prepareExport(path, opts);
  try {
    opts.onProgress?.({ phase: 'map', bytesDone: 1, bytesTotal: 1 });
    const known = opts.tar ? await measuredSize(p, opts) : p.layout.size;
    const start = sink.position;
    const byBytes = known !== undefined;
    const total = known ?? p.layout.readBytes;
    let guestRead = 0;
    let headerBytes = 0;
    const progress = () =>
      opts.onProgress?.({ phase: 'write', bytesDone: Math.min(total, byBytes ? sink.position - start - headerBytes : guestRead), bytesTotal: total });
    if (opts.tar) {
      const header = tarHeader(opts.tar, known!);
      headerBytes = header.length;
      await sink.write(header);
    }
    opts.onProgress?.({ phase: 'write', bytesDone: 0, bytesTotal: total });
    const source = await guestSource(p.chain, opts.signal, (n) => {
      guestRead += n;
      if (!byBytes) progress();
    });
    const imageStart = sink.position;
    const out = new CoalescingSink(new ProgressSink(sink, () => byBytes && progress(), opts.signal));
    await p.layout.write(source, out);
    await out.flush();
    const imageBytes = sink.position - imageStart;
    if (known !== undefined && imageBytes !== known) {
      // Pass one and pass two disagree: the stream (and a tar header's size) would be wrong.
      throw new Error(`${p.layout.format} stream: wrote ${imageBytes} bytes where the layout said ${known}`);
    }
    if (opts.tar) await sink.zeros(tarTrailerLength(imageBytes));
    opts.onProgress?.({ phase: 'write', bytesDone: total, bytesTotal: total });
    return {
      image: path,
      source: p.source,
      target: { format: p.layout.format, parameters: p.layout.parameters },
      imageBytes,
      bytes: sink.position - start,
      dataBytes: guestRead,
      ...(opts.tar ? { tar: { name: opts.tar } } : {}),
      warnings: p.warnings,
    };
  } finally {
    await p.close();
  }
}
