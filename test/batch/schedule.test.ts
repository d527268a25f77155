/**
 * The scheduling rule, with workers the test finishes by hand: by default one image at a time per
 * filesystem and filesystems in parallel; --jobs N runs N at a time; a stop starts nothing new;
 * order is kept as far as the limits allow.
 */
import { describe, expect, it } from 'vitest';
import { runScheduled, scheduleLimits } from '../../src/batch/schedule.js';

interface Job {
  id: string;
  lane: string;
}

/** Workers that wait until the test releases them; records who is running. */
function harness(jobs: Job[]) {
  const release = new Map<string, () => void>();
  const running = new Set<string>();
  const started: string[] = [];
  let maxTotal = 0;
  const maxPerLane = new Map<string, number>();
  const worker = (j: Job) =>
    new Promise<void>((resolve) => {
      running.add(j.id);
      started.push(j.id);
      maxTotal = Math.max(maxTotal, running.size);
      const inLane = jobs.filter((x) => x.lane === j.lane && running.has(x.id)).length;
      maxPerLane.set(j.lane, Math.max(maxPerLane.get(j.lane) ?? 0, inLane));
      release.set(j.id, () => {
        running.delete(j.id);
        resolve();
      });
    });
  const settle = () => new Promise((r) => setImmediate(r));
  return {
    worker,
    running,
    started,
    stats: () => ({ maxTotal, maxPerLane }),
    async finish(id: string) {
      const r = release.get(id);
      if (!r) throw new Error(`${id} is not running`);
      release.delete(id);
      r();
      await settle();
    },
    settle,
  };
}

const jobs: Job[] = [
  { id: 'a1', lane: 'A' },
  { id: 'a2', lane: 'A' },
  { id: 'b1', lane: 'B' },
  { id: 'a3', lane: 'A' },
  { id: 'b2', lane: 'B' },
  { id: 'c1', lane: 'C' },
];

describe('runScheduled', () => {
  it('default: one per filesystem at a time, filesystems in parallel, each lane in order', async () => {
    const h = harness(jobs);
    const done = runScheduled(jobs, (j) => j.lane, scheduleLimits(undefined), h.worker);
    await h.settle();
    expect([...h.running].sort()).toEqual(['a1', 'b1', 'c1']);
    await h.finish('a1');
    expect([...h.running].sort()).toEqual(['a2', 'b1', 'c1']);
    await h.finish('c1');
    await h.finish('b1');
    expect([...h.running].sort()).toEqual(['a2', 'b2']);
    await h.finish('a2');
    await h.finish('b2');
    await h.finish('a3');
    const started = await done;
    expect(started.map((j) => j.id)).toEqual(['a1', 'b1', 'c1', 'a2', 'b2', 'a3']);
    expect(h.stats().maxTotal).toBe(3);
    expect([...h.stats().maxPerLane.values()]).toEqual([1, 1, 1]);
  });

  it('--jobs 2: two at a time whatever the filesystem, in the order given', async () => {
    const h = harness(jobs);
    const done = runScheduled(jobs, (j) => j.lane, scheduleLimits(2), h.worker);
    await h.settle();
    expect([...h.running]).toEqual(['a1', 'a2']);
    await h.finish('a2');
    expect([...h.running]).toEqual(['a1', 'b1']);
    for (const id of ['a1', 'b1', 'a3', 'b2', 'c1']) {
      while (!h.running.has(id)) await h.settle();
      await h.finish(id);
    }
    await done;
    expect(h.stats().maxTotal).toBe(2);
    expect(h.started).toEqual(['a1', 'a2', 'b1', 'a3', 'b2', 'c1']);
  });

  it('a stop starts nothing new; the running ones are awaited; the started ones are returned', async () => {
    const h = harness(jobs);
    const ac = new AbortController();
    const done = runScheduled(jobs, (j) => j.lane, scheduleLimits(undefined), h.worker, ac.signal);
    await h.settle();
    ac.abort();
    let resolved = false;
    void done.then(() => (resolved = true));
    await h.finish('a1');
    expect(h.running.has('a2')).toBe(false);
    expect(resolved).toBe(false); // b1 and c1 still run
    await h.finish('b1');
    await h.finish('c1');
    expect((await done).map((j) => j.id)).toEqual(['a1', 'b1', 'c1']);
  });

  it('a worker that throws stops new starts; the error comes once the others are done', async () => {
    const started: string[] = [];
    const err = new Error('boom');
    let releaseB!: () => void;
    const p = runScheduled(jobs, (j) => j.lane, scheduleLimits(undefined), async (j) => {
      started.push(j.id);
      if (j.id === 'a1') throw err;
      if (j.id === 'b1') await new Promise<void>((r) => (releaseB = r));
    });
    let settled = false;
    p.catch(() => {}).finally(() => (settled = true));
    await new Promise((r) => setImmediate(r));
    expect(settled).toBe(false);
    releaseB();
    await expect(p).rejects.toBe(err);
    expect(started).toEqual(['a1', 'b1', 'c1']);
  });

  it('limits: --jobs must be a positive whole number', () => {
    expect(scheduleLimits(undefined)).toEqual({ total: Infinity, perLane: 1 });
    expect(scheduleLimits(3)).toEqual({ total: 3, perLane: 3 });
    expect(() => scheduleLimits(0)).toThrow(RangeError);
    expect(() => scheduleLimits(1.5)).toThrow(RangeError);
  });

  it('no items: resolves at once', async () => {
    expect(await runScheduled([], () => 'x', scheduleLimits(undefined), async () => {})).toEqual([]);
  });
});
