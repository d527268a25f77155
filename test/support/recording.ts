/**
 * RecordingStorage logs every mutating operation across all files in one global order, so a test can
 * rebuild the state of every file after a crash at any point:
 * - process kill (kill -9): every operation before the cut happened; the OS keeps them all.
 * - power loss: per file, only what a flush (fdatasync) made durable, plus any subset of the writes
 *   issued since that file's last flush; creations/removals durable only after a directory sync.
 */
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { MemoryStorage, type Storage } from '../../src/blockdev/storage.js';
import type { BlockDevice, OpenOptions } from '../../src/blockdev/types.js';

export type Op =
  | { kind: 'write'; path: string; offset: number; bytes: Uint8Array }
  | { kind: 'truncate'; path: string; length: number }
  | { kind: 'punch'; path: string; offset: number; length: number }
  | { kind: 'flush'; path: string }
  | { kind: 'create'; path: string }
  | { kind: 'remove'; path: string }
  | { kind: 'syncDir'; path: string };

export class RecordingStorage implements Storage {
  readonly log: Op[] = [];
  readonly initial = new Map<string, Uint8Array>();
  readonly live = new MemoryStorage();

  constructor(files: Map<string, Uint8Array>) {
    for (const [p, b] of files) {
      this.initial.set(p, b);
      this.live.put(p, b.slice());
    }
  }

  private wrap(d: BlockDevice, path: string): BlockDevice {
    const log = this.log;
    return {
      path,
      get writable() {
        return d.writable;
      },
      size: () => d.size(),
      allocated: () => d.allocated(),
      read: (b, o) => d.read(b, o),
      nextData: (o) => d.nextData(o),
      nextHole: (o) => d.nextHole(o),
      async write(bytes, offset) {
        await d.write(bytes, offset);
        log.push({ kind: 'write', path, offset, bytes: bytes.slice() });
      },
      async truncate(length) {
        await d.truncate(length);
        log.push({ kind: 'truncate', path, length });
      },
      async punchHole(offset, length) {
        await d.punchHole(offset, length);
        log.push({ kind: 'punch', path, offset, length });
      },
      async flush() {
        await d.flush();
        log.push({ kind: 'flush', path });
      },
      close: () => d.close(),
    };
  }

  async open(path: string, opts: OpenOptions): Promise<BlockDevice> {
    return this.wrap(await this.live.open(path, opts), path);
  }
  async create(path: string): Promise<BlockDevice> {
    const d = await this.live.create(path);
    this.log.push({ kind: 'create', path });
    return this.wrap(d, path);
  }
  async remove(path: string): Promise<void> {
    await this.live.remove(path);
    this.log.push({ kind: 'remove', path });
  }
  exists(path: string): Promise<boolean> {
    return this.live.exists(path);
  }
  async syncDir(path: string): Promise<void> {
    this.log.push({ kind: 'syncDir', path });
  }
}

async function applyOp(files: Map<string, MemoryBlockDevice>, op: Op): Promise<void> {
  switch (op.kind) {
    case 'create':
      files.set(op.path, new MemoryBlockDevice(op.path));
      return;
    case 'remove':
      files.delete(op.path);
      return;
    case 'flush':
    case 'syncDir':
      return;
    default: {
      const d = files.get(op.path);
      if (!d) return; // the file's creation was lost
      if (op.kind === 'write') await d.write(op.bytes, op.offset);
      else if (op.kind === 'truncate') await d.truncate(op.length);
      else await d.punchHole(op.offset, op.length);
    }
  }
}

/** Files as they are after the first `n` operations all happened (process kill). */
export async function stateAfter(initial: Map<string, Uint8Array>, log: Op[], n: number): Promise<MemoryStorage> {
  const files = new Map<string, MemoryBlockDevice>();
  for (const [p, b] of initial) files.set(p, MemoryBlockDevice.from(b.slice(), p));
  for (const op of log.slice(0, n)) await applyOp(files, op);
  const s = new MemoryStorage();
  for (const [p, d] of files) s.files.set(p, d);
  return s;
}

/**
 * Power loss after the first `n` operations: operations are durable up to each file's last flush
 * before the cut (and, for creation/removal, the last directory sync); of the rest, `keep(i)` decides
 * which survive. Surviving writes apply in log order (a subset, with the others dropped).
 */
export async function powerLossState(
  initial: Map<string, Uint8Array>,
  log: Op[],
  n: number,
  keep: (index: number) => boolean,
): Promise<MemoryStorage> {
  const lastFlush = new Map<string, number>();
  let lastDirSync = -1;
  for (let i = 0; i < n; i++) {
    const op = log[i]!;
    if (op.kind === 'flush') lastFlush.set(op.path, i);
    if (op.kind === 'syncDir') lastDirSync = i;
  }
  const durable = (i: number): boolean => {
    const op = log[i]!;
    if (op.kind === 'create' || op.kind === 'remove') return i < lastDirSync;
    return i < (lastFlush.get(op.path) ?? -1);
  };
  const files = new Map<string, MemoryBlockDevice>();
  for (const [p, b] of initial) files.set(p, MemoryBlockDevice.from(b.slice(), p));
  for (let i = 0; i < n; i++) {
    if (durable(i) || keep(i)) await applyOp(files, log[i]!);
  }
  const s = new MemoryStorage();
  for (const [p, d] of files) s.files.set(p, d);
  return s;
}

/** Indices of operations after the last durability point of their file (candidates to lose). */
export function volatileOps(log: Op[], n: number): number[] {
  const out: number[] = [];
  const lastFlush = new Map<string, number>();
  let lastDirSync = -1;
  for (let i = 0; i < n; i++) {
    const op = log[i]!;
    if (op.kind === 'flush') lastFlush.set(op.path, i);
    if (op.kind === 'syncDir') lastDirSync = i;
  }
  for (let i = 0; i < n; i++) {
    const op = log[i]!;
    if (op.kind === 'flush' || op.kind === 'syncDir') continue;
    const durableUpTo = op.kind === 'create' || op.kind === 'remove' ? lastDirSync : (lastFlush.get(op.path) ?? -1);
    if (i > durableUpTo) out.push(i);
  }
  return out;
}
