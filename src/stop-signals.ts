/**
 * SIGINT and SIGTERM as an AbortSignal for the length of one command: the first signal calls
 * `onFirst` (the reporter says "stopping") and aborts; the conversion stops at its next safe point.
 * The handlers are removed when `fn` settles, so a later signal gets node's default behaviour.
 */
export async function withStopSignals<T>(onFirst: () => void, fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ac = new AbortController();
  const onSignal = () => {
    if (!ac.signal.aborted) onFirst();
    ac.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    return await fn(ac.signal);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
