/**
 * The one interface through which all image access goes. Drivers and the core never touch `fs`:
 * tests substitute an in-memory device, a recording device, or a device that crashes or fails on
 * the Nth operation.
 */
export interface BlockDevice {
  /** A name for messages (the file path for real files). */
  readonly path: string;
  readonly writable: boolean;
  /** Current length in bytes. */
  size(): Promise<number>;
  /** Bytes the storage actually allocates (st_blocks·512 for files), for "disk size" reports. */
  allocated(): Promise<number>;
  /** Reads up to buf.length bytes at `offset`; returns the count (short only at end of file). */
  read(buf: Uint8Array, offset: number): Promise<number>;
  /** Writes all of buf at `offset`, extending the file if needed. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** Makes every completed write durable (fdatasync). The ordering points of every protocol. */
  flush(): Promise<void>;
  /**
   * A hint, optional: written bytes of [offset, offset+length) may start on their way to the disk now,
   * so that the next flush has less left to write. Orders and guarantees nothing; never fails.
   */
  startWriteback?(offset: number, length: number): void;
  truncate(length: number): Promise<void>;
  /** Deallocates the range; it then reads as zeros. Falls back to writing zeros. */
  punchHole(offset: number, length: number): Promise<void>;
  /** First offset ≥ `offset` holding data (SEEK_DATA), or null when only holes follow. */
  nextData(offset: number): Promise<number | null>;
  /** First offset ≥ `offset` inside a hole (SEEK_HOLE); the size when none (EOF is a hole). */
  nextHole(offset: number): Promise<number>;
  close(): Promise<void>;
}

export interface OpenOptions {
  write?: boolean;
  /**
   * Take an exclusive OFD lock (write) or a shared one (read-only opens). A lock held by QEMU or by
   * another imgconv makes the open fail with LockedError.
   */
  lock?: boolean;
}

/** Opens related files (backing files, VMDK extents, external data files) the same way. */
export type DeviceOpener = (path: string, opts: OpenOptions) => Promise<BlockDevice>;

/** Reads exactly `length` bytes or returns fewer when the file ends (zero-filled beyond). */
export async function readAt(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = await dev.read(buf.subarray(done), offset + done);
    if (n === 0) break;
    done += n;
  }
  return buf;
}

/** Reads exactly `length` bytes; `onShort` builds the error when the file ends first. */
export async function readExact(
  dev: BlockDevice,
  offset: number,
  length: number,
  onShort: (got: number) => Error,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = await dev.read(buf.subarray(done), offset + done);
    if (n === 0) throw onShort(done);
    done += n;
  }
  return buf;
}
