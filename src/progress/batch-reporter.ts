/**
 * Progress output of a batch (`imgconv inplace IMAGE...`): the same three ways as for one image —
 * an interactive view, plain lines, JSON events — each tagged by image, picked by the same rule
 * (resolveMode). The interactive view is imported only when it is used.
 */
import type { BatchEvent } from '../batch/run.js';
import { BatchJsonReporter } from './batch-json.js';
import { BatchPlainReporter } from './batch-plain.js';
import { resolveMode, type ReporterContext } from './reporter.js';

export interface BatchProgressReporter {
  /** Every event of the runner, in order. */
  event(e: BatchEvent): void;
  /** SIGINT/SIGTERM arrived: no new image starts; running conversions stop at their next safe point. */
  stopping(): void;
  /** Stops rendering; the last frame stays on the terminal. */
  close(): Promise<void>;
  /** The final frame already carries the result table, so the CLI does not print it again on the same terminal. */
  readonly showsReport: boolean;
}

export async function createBatchReporter(ctx: ReporterContext): Promise<BatchProgressReporter> {
  const mode = resolveMode({ ...ctx, isTTY: ctx.stream.isTTY === true });
  switch (mode) {
    case 'ink': {
      process.env.NODE_ENV ??= 'production';
      const { BatchInkReporter } = await import('./batch-interactive.js');
      return new BatchInkReporter(ctx.stream, { showsReport: ctx.stdoutIsTTY });
    }
    case 'json':
      return new BatchJsonReporter((line) => ctx.stream.write(line));
    case 'plain':
    case 'none':
      return new BatchPlainReporter((text) => ctx.stream.write(text), { progress: mode === 'plain' });
  }
}
