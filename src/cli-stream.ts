/**
 * The streaming commands on the CLI: `stream` (an image to stdout, strictly in order), `measure`
 * (exactly how many bytes `stream` will write) and `unstream` (a streamed image from stdin into a
 * new file). A thin layer over src/stream/; registered by src/cli.ts.
 */
import { withStopSignals } from './stop-signals.js';
import { fstatSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { setPipeSize } from './blockdev/syscalls.js';
import type { FormatDriver } from './driver.js';
import { ImgconvError, UsageError } from './errors.js';
import { measureExport, streamExport, type ExportOptions, type MeasureReport } from './stream/export.js';
import { unstreamImage } from './stream/import.js';
import { createStreamReporter, STREAM_PROGRESS_MODES, type StreamPhase, type StreamProgressMode, type StreamReporter } from './stream/progress.js';
import { WritableSink } from './stream/sink.js';
import { parseTargetOptions, targetOptionsOption } from './cli-options.js';


/** A pipe's buffer, when fd 0/1 is a pipe: larger than Linux's 64 KiB default, for throughput. */
const PIPE_BYTES = 1 << 20;

function growPipe(fd: number): void {
  try {
    if (fstatSync(fd).isFIFO()) setPipeSize(fd, PIPE_BYTES);
  } catch {
    // Not a pipe, or no fcntl: the default buffer works, only a little slower.
  }
}

/** -o may be given several times; each value is key=value[,key=value] (not variadic: IMAGE follows). */
const targetOption = () => targetOptionsOption().default([]);

const progressOption = () =>
  new Option('--progress <mode>', 'progress on stderr: auto (= plain), plain (a line per phase and per 10%), json (one object per line), none')
    .choices(STREAM_PROGRESS_MODES)
    .default('auto');

/**
 * Runs `fn` with a reporter and SIGINT/SIGTERM wired to an AbortSignal. An ImgconvError the reporter
 * already showed (JSON mode) sets exit code 1 without a second line; anything else goes to main().
 */
async function withReporter(
  mode: StreamProgressMode,
  phases: readonly StreamPhase[],
  fn: (reporter: StreamReporter, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const reporter = createStreamReporter(mode, process.stderr, phases);
  try {
    await withStopSignals(() => reporter.stopping(), (signal) => fn(reporter, signal));
  } catch (e) {
    reporter.fail(e);
    if (reporter.showsErrors && e instanceof ImgconvError) {
      process.exitCode = 1;
      return;
    }
    throw e;
  }
}

function measureHuman(r: MeasureReport): string {
  const lines = [`required size: ${r.required}`, `fully allocated size: ${r.fullyAllocated}`];
  if (r.tar) lines.push(`tar member ${JSON.stringify(r.tar.name)}: image ${r.tar.imageRequired} bytes (fully allocated ${r.tar.imageFullyAllocated})`);
  return lines.join('\n');
}

function warn(lines: string[]): void {
  for (const l of lines) process.stderr.write(`imgconv: warning: ${l}\n`);
}

export function registerStreamCommands(program: Command, drivers: readonly FormatDriver[]): void {
  const exportOptions = (o: { to: string; options?: string[]; format?: string; tar?: string }): ExportOptions => ({
    to: o.to,
    options: parseTargetOptions(o.options),
    drivers,
    ...(o.format ? { format: o.format } : {}),
    ...(o.tar !== undefined ? { tar: o.tar } : {}),
  });

  program
    .command('stream')
    .description('write IMAGE (its backing chain collapsed) as FMT to stdout, strictly sequentially (pipe or redirect it)')
    .argument('<image>')
    .requiredOption('--to <fmt>', 'format of the stream: qcow2, vhd, vmdk (streamOptimized) or raw')
    .addOption(targetOption())
    .addOption(new Option('-f, --format <fmt>', 'source format (skips probing)'))
    .option('--tar <name>', 'wrap the image as member NAME of a one-member tar stream (for assembling an OVA)')
    .addOption(progressOption())
    .action(async (image: string, o: { to: string; options?: string[]; format?: string; tar?: string; progress: StreamProgressMode }) => {
      if (process.stdout.isTTY) throw new UsageError('stdout is a terminal: redirect it to a file or pipe it (imgconv stream … > disk.img)');
      const opts = exportOptions(o);
      growPipe(1);
      const phases: StreamPhase[] = ['map', ...(o.tar !== undefined ? (['measure'] as const) : []), 'write'];
      await withReporter(o.progress, phases, async (reporter, signal) => {
        const sink = new WritableSink(process.stdout);
        const r = await streamExport(image, sink, { ...opts, signal, onProgress: (e) => reporter.progress(e) });
        await sink.flush();
        if (!reporter.showsErrors) warn(r.warnings);
        reporter.done({
          image: r.image,
          source: r.source.format,
          target: r.target.format,
          parameters: r.target.parameters,
          bytes: r.bytes,
          imageBytes: r.imageBytes,
          dataBytes: r.dataBytes,
          tar: r.tar?.name ?? null,
          warnings: r.warnings,
        });
      });
    });

  program
    .command('measure')
    .description('the exact size `imgconv stream` writes for IMAGE, and the size with every cluster allocated')
    .argument('<image>')
    .requiredOption('--to <fmt>', 'format of the stream')
    .addOption(targetOption())
    .addOption(new Option('-f, --format <fmt>', 'source format (skips probing)'))
    .option('--tar <name>', 'measure the one-member tar stream `stream --tar NAME` writes')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (image: string, o: { to: string; options?: string[]; format?: string; tar?: string; output: string }) => {
      const r = await measureExport(image, exportOptions(o));
      warn(r.warnings);
      if (o.output === 'json') {
        process.stdout.write(
          JSON.stringify(
            {
              required: r.required,
              'fully-allocated': r.fullyAllocated,
              format: r.target.format,
              parameters: r.target.parameters,
              ...(r.tar ? { tar: { name: r.tar.name, 'image-required': r.tar.imageRequired, 'image-fully-allocated': r.tar.imageFullyAllocated } } : {}),
            },
            null,
            2,
          ) + '\n',
        );
      } else {
        process.stdout.write(measureHuman(r) + '\n');
      }
    });

  program
    .command('unstream')
    .description('read a sequentially written image from stdin and write it to DEST (a new file), as FMT')
    .argument('<dest>')
    .requiredOption('--from <fmt>', 'format of the stream on stdin: qcow2, vhd (dynamic), vmdk (streamOptimized) or raw')
    .requiredOption('--to <fmt>', 'format of DEST: raw (sparse), the stream\'s own format (a copy), or any format imgconv converts raw to in place')
    .addOption(progressOption())
    .addOption(new Option('--output <fmt>', 'output format of the report').choices(['human', 'json']).default('human'))
    .action(async (dest: string, o: { from: string; to: string; progress: StreamProgressMode; output: string }) => {
      if (process.stdin.isTTY) throw new UsageError('stdin is a terminal: pipe or redirect a stream into it (imgconv unstream … < disk.qcow2)');
      growPipe(0);
      await withReporter(o.progress, ['head', 'write', 'convert'], async (reporter, signal) => {
        const r = await unstreamImage(process.stdin, dest, { from: o.from, to: o.to, drivers, signal, onProgress: (e) => reporter.progress(e) });
        reporter.done({ ...r });
        if (o.output === 'json') process.stdout.write(JSON.stringify(r, null, 2) + '\n');
        else if (o.progress !== 'json') {
          process.stdout.write(
            [
              `${dest}: ${r.from} stream → ${r.to}, virtual size ${r.virtualSize} bytes`,
              `read ${r.streamBytes} bytes, ${r.dataBytes} bytes of guest data; file length ${r.fileLength}`,
              ...(r.conversion ? [`converted in place from raw: ${r.conversion.metadataBytes} bytes of metadata written, ${r.conversion.dataMovedBytes} bytes of data moved`] : []),
            ].join('\n') + '\n',
          );
        }
      });
    });
}
