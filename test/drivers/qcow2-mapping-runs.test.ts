/**
 * The qcow2 mapping classifies the common L2 entries inline and coalesces them into runs (a 1 TiB
 * image has 16 million entries). These tests pin that mapping() alone — not hostSpace() or check(),
 * which validate the same entries again — refuses every bad entry the inline path could let through,
 * and that runs come out exactly as the entries say.
 */
import { describe, expect, it } from 'vitest';
import { FormatError } from '../../src/errors.js';
import { encodeL2Entry } from '../../drivers/qcow2/entries.js';
import { BUILT, buildImage, getU64, openBytes, setU32, setU64 } from './qcow2-support.js';

const { cs } = BUILT;

async function mappingError(bytes: Uint8Array): Promise<FormatError> {
  const img = await openBytes(bytes);
  const e = await img.mapping().then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(FormatError);
  return e as FormatError;
}

const std = (offset: number, zero = false) => encodeL2Entry({ compressed: false, copied: offset !== 0, offset, zero, reserved: 0n }, 12);
function put(b: Uint8Array, index: number, [hi, lo]: [number, number]): void {
  setU32(b, BUILT.l2 + index * 8, hi);
  setU32(b, BUILT.l2 + index * 8 + 4, lo);
}

describe('mapping() alone refuses bad standard entries', () => {
  const cases: [string, (b: Uint8Array) => void, string][] = [
    ['data entry unaligned', (b) => setU64(b, BUILT.l2, getU64(b, BUILT.l2) + 512n), 'data cluster offset'],
    ['data entry past the end of the file', (b) => put(b, 0, std(BUILT.clusters * cs)), 'data cluster offset'],
    ['preallocated zero entry unaligned', (b) => setU64(b, BUILT.l2 + 5 * 8, getU64(b, BUILT.l2 + 5 * 8) + 512n), 'data cluster offset'],
    ['preallocated zero entry past the end of the file', (b) => put(b, 5, std(BUILT.clusters * cs, true)), 'data cluster offset'],
    ['reserved bit 1', (b) => setU64(b, BUILT.l2, getU64(b, BUILT.l2) | 2n), 'L2 entry'],
    ['reserved bit 56', (b) => setU64(b, BUILT.l2, getU64(b, BUILT.l2) | (1n << 56n)), 'L2 entry'],
    ['zero flag in a version 2 image', (b) => { setU32(b, 4, 2); b.fill(0, 72, 4096); put(b, 4, [0, 0]); }, 'L2 entry'],
  ];
  for (const [name, patch, field] of cases) {
    it(name, async () => {
      const b = buildImage();
      patch(b);
      expect((await mappingError(b)).field).toBe(field);
    });
  }
});

describe('runs', () => {
  it('the built image: one run per kind change, hosts as the entries say', async () => {
    const m = await (await openBytes(buildImage())).mapping();
    expect(m.toArray().slice(0, 7)).toEqual([
      { guest: 0, length: cs, kind: 'data', host: 5 * cs },
      { guest: cs, length: cs, kind: 'unallocated' },
      { guest: 2 * cs, length: cs, kind: 'data', host: 6 * cs },
      { guest: 3 * cs, length: cs, kind: 'zero' },
      expect.objectContaining({ guest: 4 * cs, kind: 'compressed', host: 7 * cs }),
      { guest: 5 * cs, length: cs, kind: 'zero', host: 8 * cs },
      { guest: 6 * cs, length: BUILT.size - 6 * cs, kind: 'unallocated' },
    ]);
  });

  it('back-to-back clusters merge; a gap, a kind change or a reversal splits', async () => {
    const b = buildImage();
    // guest 0,1 → host 5,6: one run; guest 2, 3 → preallocated zeros at host 8 then 7: backwards, two runs.
    put(b, 0, std(5 * cs));
    put(b, 1, std(6 * cs));
    put(b, 2, std(8 * cs, true));
    put(b, 3, std(7 * cs, true));
    put(b, 4, [0, 0]);
    put(b, 5, [0, 1]); // zero flag, no host: a plain zero cluster
    put(b, 6, [0, 1]);
    put(b, 7, [0x80000000, 0]); // COPIED alone, offset 0: unallocated
    const m = await (await openBytes(b)).mapping();
    expect(m.toArray()).toEqual([
      { guest: 0, length: 2 * cs, kind: 'data', host: 5 * cs },
      { guest: 2 * cs, length: cs, kind: 'zero', host: 8 * cs },
      { guest: 3 * cs, length: cs, kind: 'zero', host: 7 * cs },
      { guest: 4 * cs, length: cs, kind: 'unallocated' },
      { guest: 5 * cs, length: 2 * cs, kind: 'zero' },
      { guest: 7 * cs, length: BUILT.size - 7 * cs, kind: 'unallocated' },
    ]);
  });
});

describe('runs continued entry by entry (the shortcut for the next cluster of a run)', () => {
  it('a run that walks past the end of the file is refused at the first cluster outside it, by mapping and host space', async () => {
    const b = buildImage();
    // Guest 0..3 → host 6, 7, 8, 9: the last lies past the file (9 clusters), each entry one cluster on from the last.
    for (let k = 0; k < 4; k++) put(b, k, std((6 + k) * cs));
    put(b, 4, [0, 0]);
    put(b, 5, [0, 0]);
    expect((await mappingError(b)).field).toBe('data cluster offset');
    const img = await openBytes(b);
    const e = await img.hostSpace().then(() => undefined, (x: unknown) => x);
    expect(e).toBeInstanceOf(FormatError);
    expect((e as FormatError).field).toBe('data cluster offset');
  });

  it('the same walk ending inside the file is one run, in the mapping and the host space', async () => {
    const b = buildImage();
    for (let k = 0; k < 3; k++) put(b, k, std((6 + k) * cs));
    put(b, 3, std(7 * cs)); // back down: a new run (and an overlap host space reports)
    put(b, 4, [0, 0]);
    put(b, 5, [0, 0]);
    const m = await (await openBytes(b)).mapping();
    expect(m.toArray().slice(0, 3)).toEqual([
      { guest: 0, length: 3 * cs, kind: 'data', host: 6 * cs },
      { guest: 3 * cs, length: cs, kind: 'data', host: 7 * cs },
      { guest: 4 * cs, length: BUILT.size - 4 * cs, kind: 'unallocated' },
    ]);
    put(b, 3, [0, 0]);
    const hs = await (await openBytes(b)).hostSpace();
    expect(hs.ranges().filter((r) => r.role === 'data')).toEqual([expect.objectContaining({ start: 6 * cs, length: 3 * cs, what: 'data' })]);
  });

  it('a zero flag on the next cluster breaks the run', async () => {
    const b = buildImage();
    put(b, 0, std(5 * cs));
    put(b, 1, std(6 * cs, true)); // one cluster on, but preallocated zero
    put(b, 2, [0, 0]);
    put(b, 3, [0, 0]);
    put(b, 4, [0, 0]);
    put(b, 5, [0, 0]);
    const m = await (await openBytes(b)).mapping();
    expect(m.toArray().slice(0, 2)).toEqual([
      { guest: 0, length: cs, kind: 'data', host: 5 * cs },
      { guest: cs, length: cs, kind: 'zero', host: 6 * cs },
    ]);
  });
});
