/**
 * Progress output of `imgconv inplace`: one interface, three ways to show it, and the rule that
 * picks one. The interactive (ink) view is imported only when it is used, so `--version`, piped
 * and CI runs never load ink or react.
 */
import type { ConversionReport, ConvertOptions, ProgressEvent } from '../engine/convert.js';
import { PlainReporter } from './plain.js';
import { JsonReporter } from './json.js';

export type ProgressMode = 'auto' | 'plain' | 'json' | 'none';
export const PROGRESS_MODES: readonly ProgressMode[] = ['auto', 'plain', 'json', 'none'];

/** What `inplace` tells its reporter, in this order: begin, progress…, [stopping], done or fail, close. */
export interface ProgressReporter {
  /**
   * Before the conversion. The interactive view reads the plan and the host file's layout here (read
   * only); the others do nothing. May throw what planning throws (the image is then untouched).
   */
  begin(image: string, opts: ConvertOptions): Promise<void>;
  progress(e: ProgressEvent): void;
  /** SIGINT/SIGTERM arrived: the conversion is stopping at the next safe point (or finishing, past the commit). */
  stopping(): void;
  done(report: ConversionReport): Promise<void>;
  fail(error: unknown): void;
  /** Stops rendering; the last frame stays on the terminal. */
  close(): Promise<void>;
  /** fail() told the user about every error, so the CLI prints no second line for an ImgconvError. */
  readonly showsErrors: boolean;
  /** The final frame already carries the report, so the CLI does not print it again on the same terminal. */
  readonly showsReport: boolean;
}

export interface ReporterContext {
  mode: ProgressMode;
  quiet: boolean;
  /** Where progress goes (stderr). */
  stream: NodeJS.WriteStream;
  /** Whether stdout is a terminal (the report goes there). */
  stdoutIsTTY: boolean;
  env: NodeJS.ProcessEnv;
}

/** CI as ink and is-in-ci see it: CI or CONTINUOUS_INTEGRATION set to anything but 0/false. */
export function inCi(env: NodeJS.ProcessEnv): boolean {
  return ['CI', 'CONTINUOUS_INTEGRATION'].some((k) => env[k] !== undefined && env[k] !== '0' && env[k] !== 'false');
}

/** auto = ink on a terminal that is not CI (nor TERM=dumb), plain otherwise; --quiet means none. */
export function resolveMode(ctx: Pick<ReporterContext, 'mode' | 'quiet' | 'env'> & { isTTY: boolean }): 'ink' | 'plain' | 'json' | 'none' {
  if (ctx.quiet) return 'none';
  if (ctx.mode !== 'auto') return ctx.mode;
  return ctx.isTTY && !inCi(ctx.env) && ctx.env.TERM !== 'dumb' ? 'ink' : 'plain';
}

export async function createReporter(ctx: ReporterContext): Promise<ProgressReporter> {
  const mode = resolveMode({ ...ctx, isTTY: ctx.stream.isTTY === true });
  switch (mode) {
    case 'ink': {
      // React's development build checks and measures every render; nothing here debugs React.
      process.env.NODE_ENV ??= 'production';
      const { InkReporter } = await import('./interactive.js');
      return new InkReporter(ctx.stream, { showsReport: ctx.stdoutIsTTY });
    }
    case 'json':
      return new JsonReporter((line) => ctx.stream.write(line));
    case 'plain':
    case 'none':
      return new PlainReporter((text) => ctx.stream.write(text), { progress: mode === 'plain' });
  }
}
