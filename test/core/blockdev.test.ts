import { afterAll, describe, expect, it, vi } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { FileBlockDevice } from '../../src/blockdev/file.js';
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { OverlayDevice } from '../../src/blockdev/overlay.js';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import { LockedError } from '../../src/errors.js';
import { qemuAvailable, withTmpDir } from '../support/qemu.js';

const tmp = withTmpDir('imgconv-blockdev-');
afterAll(() => tmp.cleanup());
let counter = 0;
const fresh = (bytes = new Uint8Array(0)) => {
  const p = tmp.path(`f${counter++}`);
  writeFileSync(p, bytes);
  return p;
};

type Op =
  | { op: 'write'; offset: number; len: number; fill: number }
  | { op: 'truncate'; len: number }
  | { op: 'punch'; offset: number; len: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ op: fc.constant('write' as const), offset: fc.nat(600_000), len: fc.integer({ min: 1, max: 150_000 }), fill: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ op: fc.constant('truncate' as const), len: fc.nat(700_000) }),
  fc.record({ op: fc.constant('punch' as const), offset: fc.nat(600_000), len: fc.integer({ min: 1, max: 300_000 }) }),
);

async function apply(dev: BlockDevice, ops: Op[]): Promise<void> {
  for (const o of ops) {
    if (o.op === 'write') await dev.write(new Uint8Array(o.len).fill(o.fill), o.offset);
    else if (o.op === 'truncate') await dev.truncate(o.len);
    else await dev.punchHole(o.offset, o.len);
  }
}

/** Walks data/hole boundaries and checks that every byte claimed to be in a hole reads as zero. */
async function checkHoles(dev: BlockDevice): Promise<void> {
  const size = await dev.size();
  let pos = 0;
  while (pos < size) {
    const d = await dev.nextData(pos);
    const holeEnd = d === null ? size : d;
    if (holeEnd > pos) expect((await readAt(dev, pos, holeEnd - pos)).every((b) => b === 0)).toBe(true);
    if (d === null) break;
    expect(d).toBeGreaterThanOrEqual(pos);
    const h = await dev.nextHole(d);
    expect(h).toBeGreaterThan(d);
    pos = h;
  }
}

describe('FileBlockDevice and MemoryBlockDevice', () => {
  test.prop([fc.array(opArb, { maxLength: 12 })], { numRuns: 40 })('hold the same bytes after the same operations', async (ops) => {
    const file = await FileBlockDevice.open(fresh(), { write: true });
    const mem = new MemoryBlockDevice();
    try {
      await apply(file, ops);
      await apply(mem, ops);
      await file.flush();
      const size = await file.size();
      expect(await mem.size()).toBe(size);
      expect(Buffer.from(await readAt(file, 0, size)).equals(Buffer.from(await readAt(mem, 0, size)))).toBe(true);
      await checkHoles(file);
      await checkHoles(mem);
    } finally {
      await file.close();
    }
  });

  it('finds data and holes with SEEK_DATA/SEEK_HOLE without reading', async () => {
    const dev = await FileBlockDevice.open(fresh(), { write: true });
    try {
      await dev.truncate(1 << 20);
      await dev.write(new Uint8Array(4096).fill(7), 196608);
      expect(await dev.nextData(0)).toBe(196608);
      expect(await dev.nextHole(196608)).toBe(200704);
      expect(await dev.nextData(200704)).toBeNull();
      await dev.punchHole(196608, 4096);
      expect(await dev.nextData(0)).toBeNull();
      expect(await dev.size()).toBe(1 << 20);
      // At and past the end: no data, the hole is the end (answered by lseek's ENXIO, no fstat).
      await dev.write(new Uint8Array(4096).fill(7), (1 << 20) - 4096);
      expect(await dev.nextData(0)).toBe((1 << 20) - 4096);
      expect(await dev.nextHole((1 << 20) - 4096)).toBe(1 << 20);
      expect(await dev.nextData(1 << 20)).toBeNull();
      expect(await dev.nextData((1 << 20) + 12345)).toBeNull();
      expect(await dev.nextHole(1 << 20)).toBe(1 << 20);
      expect(await dev.nextHole((1 << 20) + 12345)).toBe(1 << 20);
      // The length as it is after writes that grow the file, not as it was.
      await dev.write(new Uint8Array(10).fill(1), 2 << 20);
      expect(await dev.nextData((1 << 20) + 1)).toBe(2 << 20);
      expect(await dev.nextHole(2 << 20)).toBe((2 << 20) + 10);
      expect(await dev.nextHole((2 << 20) + 10)).toBe((2 << 20) + 10);
    } finally {
      await dev.close();
    }
  });

  it('short reads only at end of file', async () => {
    const dev = await FileBlockDevice.open(fresh(new Uint8Array(1000).fill(1)));
    const buf = new Uint8Array(4096);
    expect(await dev.read(buf, 0)).toBe(1000);
    expect(await dev.read(buf, 5000)).toBe(0);
    await dev.close();
  });
});

describe('fallbacks without syscalls', () => {
  it('punch writes zeros and everything counts as data', async () => {
    vi.resetModules();
    process.env.IMGCONV_NO_SYSCALLS = '1';
    try {
      const { FileBlockDevice: F } = await import('../../src/blockdev/file.js');
      const { syscallsAvailable } = await import('../../src/blockdev/syscalls.js');
      expect(syscallsAvailable()).toBe(false);
      const dev = await F.open(fresh(new Uint8Array(10000).fill(9)), { write: true });
      await dev.punchHole(100, 200);
      const back = await readAt(dev, 0, 10000);
      expect(back.subarray(100, 300).every((b) => b === 0)).toBe(true);
      expect(back[99]).toBe(9);
      expect(back[300]).toBe(9);
      expect(await dev.nextData(0)).toBe(0);
      expect(await dev.nextHole(0)).toBe(10000);
      expect(await dev.nextData(9999)).toBe(9999);
      expect(await dev.nextData(10000)).toBeNull();
      expect(await dev.nextHole(20000)).toBe(10000);
      await dev.close();
    } finally {
      delete process.env.IMGCONV_NO_SYSCALLS;
      vi.resetModules();
    }
  });
});

describe('locking', () => {
  it('a second writer is refused while the first holds the file', async () => {
    const p = fresh(new Uint8Array(4096));
    const a = await FileBlockDevice.open(p, { write: true });
    try {
      await expect(FileBlockDevice.open(p, { write: true })).rejects.toThrow(LockedError);
    } finally {
      await a.close();
    }
    const b = await FileBlockDevice.open(p, { write: true });
    await b.close();
  });

  it.runIf(qemuAvailable())('refuses an image that a running QEMU process holds, naming QEMU', async () => {
    const p = fresh(new Uint8Array(1 << 20));
    // qemu-io keeps the image open (with QEMU's OFD locks on bytes 100+/200+) while it waits for commands.
    const q = spawn('qemu-io', ['-f', 'raw', p], { stdio: ['pipe', 'pipe', 'pipe'] });
    try {
      await new Promise<void>((resolve, reject) => {
        q.stdout.once('data', () => resolve());
        q.once('exit', (c) => reject(new Error(`qemu-io exited ${c}`)));
        q.stdin.write('help\n');
      });
      const err = await FileBlockDevice.open(p, { write: true }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(LockedError);
      expect((err as Error).message).toMatch(/in use by QEMU/);
      // Reading is still allowed (like qemu-img info -U).
      const ro = await FileBlockDevice.open(p, { write: false });
      await ro.close();
    } finally {
      q.stdin.end('quit\n');
      await new Promise((r) => q.once('exit', r));
    }
  });
});

describe('OverlayDevice with hole ranges (the data file as an adoption will leave it)', () => {
  const holesArb = fc
    .array(fc.tuple(fc.nat(700_000), fc.integer({ min: 1, max: 100_000 })), { maxLength: 6 })
    .map((pairs) => {
      // Sorted and disjoint, as the adoption's stale ranges are.
      const out: { start: number; length: number }[] = [];
      for (const [s, l] of pairs.sort((a, b) => a[0] - b[0])) {
        const prevEnd = out.length ? out[out.length - 1]!.start + out[out.length - 1]!.length : 0;
        if (s > prevEnd) out.push({ start: s, length: l });
      }
      return out;
    });

  test.prop([fc.array(opArb, { maxLength: 12 }), holesArb, fc.nat(800_000)], { numRuns: 60 })(
    'reads the device cut or extended to the length with the ranges zeroed, and reports those ranges as holes',
    async (ops, holes, length) => {
      const dev = new MemoryBlockDevice();
      await apply(dev, ops);
      const view = new OverlayDevice(dev, [], length, holes);
      const expected = new Uint8Array(length);
      expected.set((await readAt(dev, 0, Math.min(length, await dev.size()))).subarray(0, length));
      for (const h of holes) expected.fill(0, Math.min(h.start, length), Math.min(h.start + h.length, length));
      expect(await view.size()).toBe(length);
      expect(Buffer.from(await readAt(view, 0, length)).equals(Buffer.from(expected))).toBe(true);
      await checkHoles(view);
      for (const h of holes) {
        if (h.start >= length) continue;
        const d = await view.nextData(h.start);
        expect(d === null || d >= Math.min(h.start + h.length, length)).toBe(true);
        expect(await view.nextHole(h.start)).toBe(h.start);
      }
    },
  );
});
