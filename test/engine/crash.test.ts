/**
 * Crash consistency of the conversion protocol. A real conversion runs on recording storage; then, for
 * every prefix of its operation log (process kill) and for sampled power-loss states (each file durable
 * up to its last flush, plus a random subset of later writes), `recover` must leave exactly one valid
 * image — the source format or the target — with the original guest content, and a second `recover`
 * must change nothing.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { allDrivers } from '../../drivers/index.js';
import { convertInPlace } from '../../src/engine/convert.js';
import { recover } from '../../src/engine/recover.js';
import { journalPath } from '../../src/engine/journal.js';
import { openImage } from '../../src/image.js';
import { GuestReader } from '../../src/guest.js';
import { checkImage } from '../../src/check.js';
import type { MemoryStorage } from '../../src/blockdev/storage.js';
import { RecordingStorage, powerLossState, stateAfter, volatileOps, type Op } from '../support/recording.js';
import { qemuAvailable, qemuImg, qemuIo, withTmpDir } from '../support/qemu.js';

const PATH = '/mem/disk.img';

async function guestDigest(storage: MemoryStorage): Promise<{ format: string; sha: string; clean: boolean }> {
  const chain = await openImage(PATH, { drivers: allDrivers, opener: (p, o) => storage.open(p, o), backing: false });
  try {
    const img = chain.layers[0]!;
    const r = await checkImage(img);
    return { format: img.format, sha: await (await GuestReader.create(chain)).sha256(), clean: r.corruptions === 0 && r.checkErrors === 0 };
  } finally {
    await chain.close();
  }
}

function fileDigests(storage: MemoryStorage): string {
  const h = createHash('sha256');
  for (const [p, d] of [...storage.files].sort(([a], [b]) => a.localeCompare(b))) h.update(p).update(d.snapshot());
  return h.digest('hex');
}

interface Case {
  name: string;
  source: Uint8Array;
  sourceFormat: string;
  to: string;
}

async function record(c: Case): Promise<{ rec: RecordingStorage; log: Op[] }> {
  const rec = new RecordingStorage(new Map([[PATH, c.source]]));
  await convertInPlace(PATH, { to: c.to, format: c.sourceFormat, drivers: allDrivers, storage: rec });
  return { rec, log: rec.log };
}

async function expectRecovers(state: MemoryStorage, c: Case, want: string, label: string): Promise<void> {
  const r = await recover(PATH, { drivers: allDrivers, storage: state });
  expect(await state.exists(journalPath(PATH)), `${label}: journal left behind`).toBe(false);
  const g = await guestDigest(state);
  expect([c.sourceFormat, c.to], `${label}: ${r.action}`).toContain(g.format);
  expect(g.sha, `${label}: guest content after ${r.action}`).toBe(want);
  expect(g.clean, `${label}: check after ${r.action}`).toBe(true);
  const before = fileDigests(state);
  const again = await recover(PATH, { drivers: allDrivers, storage: state });
  expect(again.action, `${label}: second recover`).toBe('none');
  expect(fileDigests(state), `${label}: second recover changed the files`).toBe(before);
}

/** A small deterministic PRNG so failures reproduce from the printed seed. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

const cases: Case[] = [];
const tmp = withTmpDir('imgconv-crash-');

beforeAll(() => {
  if (!qemuAvailable()) return;
  const q = tmp.path('src.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', q, '4M']);
  qemuIo(q, 'qcow2', ['write -P 0x5a 0 192k', 'write -z 1M 64k', 'write -P 0xa5 3M 64k']);
  cases.push({ name: 'qcow2 → qed', source: new Uint8Array(readFileSync(q)), sourceFormat: 'qcow2', to: 'qed' });
  const raw = new Uint8Array(2 << 20);
  raw.fill(0x33, 0, 8192); // data under the new header: must move
  raw.fill(0x44, 1 << 20, (1 << 20) + 4096);
  cases.push({ name: 'raw → qed (moves the header cluster)', source: raw, sourceFormat: 'raw', to: 'qed' });
});

describe.runIf(qemuAvailable())('crash consistency of in-place conversion', () => {
  it('records conversions that write, flush and journal', async () => {
    expect(cases.length).toBeGreaterThan(0);
    for (const c of cases) {
      const { log } = await record(c);
      expect(log.filter((o) => o.kind === 'flush').length).toBeGreaterThan(3);
      expect(log.some((o) => o.kind === 'create' && o.path === journalPath(PATH))).toBe(true);
      expect(log.some((o) => o.kind === 'remove' && o.path === journalPath(PATH))).toBe(true);
    }
  });

  it('every process-kill point recovers to one valid image with the same guest content', async () => {
    let states = 0;
    for (const c of cases) {
      const want = (await guestDigest(new RecordingStorage(new Map([[PATH, c.source]])).live)).sha;
      const { rec, log } = await record(c);
      for (let n = 0; n <= log.length; n++) {
        await expectRecovers(await stateAfter(rec.initial, log, n), c, want, `${c.name}, kill after op ${n}/${log.length}`);
        states++;
      }
    }
    console.log(`process-kill states checked: ${states}`);
  });

  it('sampled power-loss states recover too', async () => {
    const seed = Number(process.env.IMGCONV_CRASH_SEED ?? 20261122);
    const rnd = prng(seed);
    let states = 0;
    for (const c of cases) {
      const want = (await guestDigest(new RecordingStorage(new Map([[PATH, c.source]])).live)).sha;
      const { rec, log } = await record(c);
      for (let n = 1; n <= log.length; n++) {
        if (log[n - 1]!.kind !== 'flush' && rnd() > 0.25) continue; // most right after a persistence point
        const vol = volatileOps(log, n);
        for (let k = 0; k < 3; k++) {
          const keep = new Set(vol.filter(() => rnd() < 0.5));
          await expectRecovers(await powerLossState(rec.initial, log, n, (i) => keep.has(i)), c, want, `${c.name}, power loss at op ${n}, seed ${seed}, kept ${[...keep].join(',')}`);
          states++;
        }
      }
    }
    console.log(`power-loss states checked: ${states} (seed ${seed})`);
  });
});
