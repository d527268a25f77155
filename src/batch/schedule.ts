/**
 * Which images run at the same time. An in-place conversion is bound by its disk, not by the CPU:
 * two conversions on one filesystem compete for the same spindle or queue and finish no sooner
 * than one after the other, while conversions on different filesystems overlap. So by default each
 * filesystem (st_dev) is a lane that runs one image at a time, and lanes run in parallel; `--jobs N`
 * replaces both limits by N.
 */

export interface ScheduleLimits {
  /** Most items running at once over all lanes. */
  total: number;
  /** Most items running at once in one lane. */
  perLane: number;
}

/** The default rule (one per filesystem, filesystems in parallel), or N at a time when `jobs` is given. */
export function scheduleLimits(jobs: number | undefined): ScheduleLimits {
  if (jobs === undefined) return { total: Number.POSITIVE_INFINITY, perLane: 1 };
  if (!Number.isSafeInteger(jobs) || jobs < 1) throw new RangeError(`jobs must be a positive integer, not ${jobs}`);
  return { total: jobs, perLane: jobs };
}

/**
 * Runs `worker` over the items, in order as far as the limits allow (the first waiting item whose
 * lane has room starts next). Once `signal` is aborted no further item starts; running ones are
 * awaited. Resolves with the items that were started. A worker that throws stops new starts and
 * the first error is rethrown once the running ones have finished.
 */
export function runScheduled<T>(
  items: readonly T[],
  laneOf: (item: T) => string,
  limits: ScheduleLimits,
  worker: (item: T) => Promise<void>,
  signal?: AbortSignal,
): Promise<T[]> {
  const waiting = items.slice();
  const started: T[] = [];
  const perLane = new Map<string, number>();
  let running = 0;
  let failure: { error: unknown } | undefined;

  return new Promise((resolve, reject) => {
    const finishIfIdle = () => {
      if (running > 0) return;
      if (failure) reject(failure.error);
      else resolve(started);
    };
    const pump = () => {
      while (!failure && !signal?.aborted && running < limits.total) {
        const i = waiting.findIndex((it) => (perLane.get(laneOf(it)) ?? 0) < limits.perLane);
        if (i < 0) break;
        const item = waiting.splice(i, 1)[0]!;
        const lane = laneOf(item);
        perLane.set(lane, (perLane.get(lane) ?? 0) + 1);
        running++;
        started.push(item);
        // A worker's synchronous part runs in a later microtask, so starting several here is fair.
        Promise.resolve()
          .then(() => worker(item))
          .catch((e) => {
            failure ??= { error: e };
          })
          .finally(() => {
            running--;
            perLane.set(lane, perLane.get(lane)! - 1);
            pump();
            finishIfIdle();
          });
      }
    };
    signal?.addEventListener('abort', () => finishIfIdle(), { once: true });
    pump();
    finishIfIdle();
  });
}
