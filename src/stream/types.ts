/**
 * Streaming: what a format provides so that an image can be written strictly sequentially (to a pipe)
 * and read back from one. The core (src/stream/) collapses the source's backing chain into one view of
 * guest data, measures, writes and reads; each format's sequential layout and encoding lives in
 * drivers/<fmt>/stream.ts and is reached through `FormatDriver.stream`.
 *
 * Export is two passes. Pass one (`layout`) sees only where the guest has data — never the data — and
 * fixes every offset and table, so metadata can precede data (qcow2, VHD) or, for formats whose tables
 * follow the data (VMDK streamOptimized), the data's order. Pass two (`write`) reads the guest in
 * ascending order and hands the sink bytes in file order: no seek, no second look at anything written.
 */
import type { TargetOptions } from '../driver.js';
import type { DataRuns } from './collapse.js';

/** Guest bytes of the collapsed source, read in ascending order by the writers. */
export interface GuestSource {
  /** `length` guest bytes at `offset`; bytes past the virtual size read as zeros. A fresh buffer. */
  read(offset: number, length: number): Promise<Uint8Array>;
}

/**
 * Where a stream goes: appended in order. A buffer handed to `write` belongs to the sink from then on
 * (stdout may still hold it after the promise settles), so callers never modify it afterwards.
 */
export interface StreamSink {
  write(bytes: Uint8Array): Promise<void>;
  /** Appends `length` zero bytes. */
  zeros(length: number): Promise<void>;
  /** Bytes appended so far. */
  readonly position: number;
}

export interface StreamInput {
  virtualSize: number;
  /** Where the collapsed guest has data; everything else reads as zeros and produces no data. */
  data: DataRuns;
  /** `-o key=value` as given (qemu-img names where they exist). */
  options: TargetOptions;
  /** Base name the output file will have, when known (a VMDK's extent line names its own file). */
  fileName?: string;
}

/** Pass one's result: parameters, sizes, and the writer of pass two. */
export interface StreamLayout {
  format: string;
  /** Chosen parameters, for `measure` and the progress report. */
  parameters: Record<string, string | number | boolean>;
  /**
   * Exact bytes `write` produces, when the map alone decides it; undefined when it depends on the data
   * (compressed grains): the core then measures by running `write` into a counting sink.
   */
  size: number | undefined;
  /**
   * The size with every cluster allocated (qemu-img measure's "fully allocated"); for compressed
   * formats the size with data that does not compress at all.
   */
  fullyAllocated: number;
  /** Guest bytes `write` reads (the progress total when `size` is unknown). */
  readBytes: number;
  /** Pass two: the whole image, in file order. */
  write(source: GuestSource, sink: StreamSink): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------
// Import: a sequentially written image read from a pipe.

/** A stream read front to back; nothing is ever read twice. */
export interface SequentialInput {
  /** Bytes consumed so far (the stream offset of the next byte). */
  readonly position: number;
  /** Exactly `length` bytes; a FormatError naming `what` when the stream ends first. */
  read(length: number, what: string): Promise<Uint8Array>;
  /** Up to `length` bytes: fewer only at the end of the stream, empty there. */
  readUpTo(length: number): Promise<Uint8Array>;
  /** Discards `length` bytes; a FormatError naming `what` when the stream ends first. */
  skip(length: number, what: string): Promise<void>;
}

/** What the head of a stream says: enough to create the destination before any data arrives. */
export interface StreamHead {
  format: string;
  /** Undefined when only the end of the stream tells (raw). */
  virtualSize?: number;
  /** Guest bytes the stream delivers, when the head says (progress total). */
  dataBytes?: number;
  /**
   * Reads the data that follows the head, handing each piece of guest data to `emit` in stream order
   * (the buffer is the callee's), and checks the structures that end the stream. Refuses a stream
   * that breaks the order its head promised with a FormatError. Resolves to the virtual size. Bytes
   * after the image's end are left for the caller.
   */
  readData(input: SequentialInput, emit: (guest: number, bytes: Uint8Array) => Promise<void>): Promise<number>;
}

export interface StreamReader {
  /**
   * Reads and validates the metadata at the head of the stream, and refuses — before anything is
   * written anywhere — a stream whose data does not follow its metadata.
   */
  readHead(input: SequentialInput): Promise<StreamHead>;
}

/** What a format driver offers for streaming (`FormatDriver.stream`). */
export interface StreamTarget {
  /** Pass one; throws UsageError (bad -o) or UnsupportedError (an image this layout cannot hold). */
  layout(input: StreamInput): StreamLayout;
  /** Reading the layouts this format is streamed in (absent: `unstream --from` refuses the format). */
  readonly reader?: StreamReader;
  /**
   * The image is the guest bytes themselves (raw): `unstream --to` this format writes guest data at
   * guest offsets, sparse; any other non-identity destination is made from such a file in place.
   */
  readonly identity?: boolean;
}
