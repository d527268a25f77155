/**
 * The command line: a thin layer over the library. Non-interactive commands print results on
 * stdout (human or JSON) and errors on stderr, with qemu-img's exit codes where it has them.
 */
import { withStopSignals } from './stop-signals.js';
import { Command, Option } from 'commander';
import { allDrivers } from '../drivers/index.js';
import { checkExitCode, checkImage } from './check.js';
import { ImgconvError, FormatError } from './errors.js';
import { openImage, type ImageChain } from './image.js';
import { formatMapHuman, formatMapJson, mapChain } from './map.js';
import { VERSION } from './version.js';
import { convertInPlace, planConversion, ConversionFailedError, type ConversionPlan, type ConvertOptions } from './engine/convert.js';
import { recover } from './engine/recover.js';
import { journalPath } from './engine/journal.js';
import { fileStorage } from './blockdev/storage.js';
import { UsageError } from './errors.js';
import { createReporter, PROGRESS_MODES, type ProgressMode } from './progress/reporter.js';
import { convertMany, batchExitCode, type BatchReport } from './batch/run.js';
import { planMany } from './batch/plan.js';
import { createBatchReporter } from './progress/batch-reporter.js';
import { formatBatchPlan, formatBatchReport } from './progress/batch-table.js';
import { registerStreamCommands } from './cli-stream.js';
import { moveWindowOption, parseMoveWindow, parseTargetOptions, targetOptionsOption } from './cli-options.js';
import { resultFields } from './progress/batch-json.js';

export { parseTargetOptions } from './cli-options.js';

function planHuman(p: ConversionPlan): string {
  const params = Object.entries(p.target.parameters).map(([k, v]) => `${k}=${v}`).join(', ');
  const lines = [
    `image: ${p.image}`,
    `conversion: ${p.source.format} → ${p.target.format} (${params})`,
    `virtual size: ${humanSize(p.source.virtualSize)} (${p.source.virtualSize} bytes)`,
    `metadata to write: ${humanSize(p.metadataBytes)} (${p.metadataBytes} bytes)`,
    `data to move: ${humanSize(p.dataMoveBytes)} (${p.dataMoveBytes} bytes)`,
  ];
  const reasons = new Map<string, number>();
  for (const m of p.moves) reasons.set(m.reason, (reasons.get(m.reason) ?? 0) + m.length);
  for (const [r, n] of reasons) lines.push(`  ${humanSize(n)}: ${r}`);
  if (p.compactionMoveBytes) lines.push(`to move after the commit, compacting: ${humanSize(p.compactionMoveBytes)} (${p.compactionMoveBytes} bytes; the old tables' space would otherwise count as leaked)`);
  lines.push(`peak extra disk space: ${humanSize(p.peakExtraBytes)} (${p.peakExtraBytes} bytes)`);
  lines.push(`file size: ${p.source.fileLength} → at most ${p.finalLength} bytes before reclaim`);
  if (p.companion) lines.push(`creates: ${p.companion} (the ${p.target.format} image to open; ${p.image} becomes its data)`);
  if (p.adoption) lines.push(`adopts the data file: ${p.adoption.dataFile} (zeroes ${humanSize(p.adoption.zeroBytes)} (${p.adoption.zeroBytes} bytes) where the image reads zeros; length ${p.adoption.lengthBefore} → ${p.adoption.lengthAfter}), then renames it to ${p.adoption.renamedTo} (the commit point; the ${p.source.format} file is replaced)`);
  if (p.relocation) lines.push(`relocation: ${p.relocation.rounds} rounds, scratch window ${humanSize(p.relocation.scratchPeakBytes)}, commit record carries ${humanSize(p.relocation.commitBytes)} of guest bytes`);
  if (p.dropped.length) lines.push(`not carried over: ${p.dropped.join(', ')}`);
  if (p.steps) {
    const [a, b] = p.steps as [ConversionPlan, ConversionPlan];
    lines.push(
      p.adoption
        ? `in two steps (the data file becomes the raw disk, which then converts to ${b.target.format}; the second step is planned on the data file as the first leaves it):`
        : `in two steps (${a.source.format} cannot move its data where ${b.target.format} needs it, ${a.target.format} can; the second step is estimated):`,
    );
    for (const step of p.steps) lines.push(...planHuman(step).split('\n').filter((l) => !l.startsWith('image: ')).map((l) => `  ${l}`));
    if (p.alternatives) {
      lines.push('routes compared:');
      for (const a of p.alternatives) lines.push(`  ${a.via === 'direct' ? 'direct' : `through ${a.via}`}: ${a.movedBytes !== undefined ? `${humanSize(a.movedBytes)} moved${a.peakExtraBytes !== undefined ? `, peak extra ${humanSize(a.peakExtraBytes)}` : ''}` : `not possible (${a.refused})`}`);
    }
  }
  return lines.join('\n');
}

const outputOption = () => new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human');
const formatOption = () => new Option('-f, --format <fmt>', 'image format (skips probing)');

async function withImage<T>(path: string, format: string | undefined, fn: (chain: ImageChain) => Promise<T>): Promise<T> {
  if (await fileStorage.exists(journalPath(path))) {
    process.stderr.write(`imgconv: warning: ${path} has an interrupted conversion (${journalPath(path)}); run: imgconv recover ${path}\n`);
  }
  const chain = await openImage(path, { drivers: allDrivers, format });
  try {
    return await fn(chain);
  } finally {
    await chain.close();
  }
}

export function humanSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let u = 0;
  let v = n;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${Number.isInteger(v) ? v : v.toFixed(2).replace(/\.?0+$/, '')} ${units[u]}`;
}

export async function infoJson(chain: ImageChain): Promise<Record<string, unknown>> {
  const top = chain.layers[0]!;
  const i = top.info;
  const out: Record<string, unknown> = {
    filename: chain.paths[0],
    format: i.format,
    ...(i.subformat ? { subformat: i.subformat } : {}),
    'virtual-size': i.virtualSize,
    'actual-size': await top.dev.allocated(),
    'file-length': await top.dev.size(),
    ...(i.clusterSize ? { 'cluster-size': i.clusterSize } : {}),
    ...(i.backing ? { 'backing-filename': i.backing.filename, 'full-backing-filename': chain.paths[1] ?? null } : {}),
    ...(i.backing?.format ? { 'backing-filename-format': i.backing.format } : {}),
    ...(top.dataFile ? { 'data-file': top.dataFile } : {}),
    'dirty-flag': i.dirty,
    corrupt: i.corrupt,
    features: i.features,
    'format-specific': i.details,
    probed: chain.probed,
  };
  return out;
}

function infoHuman(j: Record<string, unknown>): string {
  const lines = [
    `image: ${j.filename}`,
    `file format: ${j.format}${j.probed ? ' (probed; use -f to state it)' : ''}`,
    ...(j.subformat ? [`subformat: ${j.subformat}`] : []),
    `virtual size: ${humanSize(j['virtual-size'] as number)} (${j['virtual-size']} bytes)`,
    `disk size: ${humanSize(j['actual-size'] as number)}`,
    ...(j['cluster-size'] ? [`cluster_size: ${j['cluster-size']}`] : []),
    ...(j['backing-filename'] ? [`backing file: ${j['backing-filename']}`] : []),
    ...(j['backing-filename-format'] ? [`backing file format: ${j['backing-filename-format']}`] : []),
    ...(j['data-file'] ? [`data file: ${j['data-file']}`] : []),
    ...(j['dirty-flag'] ? ['dirty: yes (needs check)'] : []),
    ...(j.corrupt ? ['corrupt: yes'] : []),
    ...((j.features as string[]).length ? [`features: ${(j.features as string[]).join(', ')}`] : []),
  ];
  const details = j['format-specific'] as Record<string, unknown>;
  if (Object.keys(details).length) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(details)) lines.push(`    ${k}: ${v}`);
  }
  return lines.join('\n');
}

interface InplaceOptions {
  to: string;
  options?: string[];
  format?: string;
  output: string;
  dryRun?: boolean;
  progress: ProgressMode;
  quiet?: boolean;
  jobs?: string;
  manifest?: string;
  moveWindow?: string;
}

function parseJobs(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < 1) throw new UsageError(`--jobs ${v}: expected a positive whole number`);
  return n;
}

/** The dry run of several images: one table; exit 1 when an image would not convert or a filesystem lacks the space. */
async function planBatch(images: string[], opts: ConvertOptions & { jobs?: number; manifest?: string }, output: string): Promise<void> {
  const plan = await planMany(images, opts);
  process.stdout.write(output === 'json' ? JSON.stringify(plan, null, 2) + '\n' : formatBatchPlan(plan));
  const short = plan.filesystems.some((f) => f.freeBytes !== undefined && f.freeBytes < f.peakExtraBytes);
  if (plan.counts.refused > 0 || plan.counts['needs-recover'] > 0 || short) process.exitCode = 1;
}

/** Many images (or a manifest, or --jobs): the batch runner with its progress output and final table. */
async function inplaceBatch(images: string[], base: ConvertOptions, o: InplaceOptions): Promise<void> {
  const jobs = parseJobs(o.jobs);
  if (o.dryRun) {
    await planBatch(images, { ...base, ...(jobs !== undefined ? { jobs } : {}), ...(o.manifest !== undefined ? { manifest: o.manifest } : {}) }, o.output);
    return;
  }
  const reporter = await createBatchReporter({
    mode: o.progress,
    quiet: o.quiet === true,
    stream: process.stderr,
    stdoutIsTTY: process.stdout.isTTY === true,
    env: process.env,
  });
  let report: BatchReport;
  try {
    report = await withStopSignals(
      () => reporter.stopping(),
      (signal) =>
        convertMany(images, {
          ...base,
          ...(jobs !== undefined ? { jobs } : {}),
          ...(o.manifest !== undefined ? { manifest: o.manifest } : {}),
          signal,
          onEvent: (e) => reporter.event(e),
        }),
    );
  } finally {
    await reporter.close();
  }
  if (o.output === 'json') {
    const { results, ...rest } = report;
    process.stdout.write(JSON.stringify({ ...rest, results: results.map((r) => ({ ...resultFields(r), ...(r.report ? { report: r.report } : {}), ...(r.recovered ? { recovered: r.recovered } : {}) })) }, null, 2) + '\n');
  } else if (!o.quiet && !reporter.showsReport) process.stdout.write(formatBatchReport(report));
  process.exitCode = batchExitCode(report);
}

export function buildProgram(): Command {
  const program = new Command();
  program.name('imgconv').description('Convert VM disk images between qcow2, QED, VMDK, VHD and raw in place').version(VERSION);
  program.showHelpAfterError();

  program
    .command('info')
    .description('show the format, virtual size, features and layout facts of an image')
    .argument('<image>')
    .addOption(formatOption())
    .addOption(outputOption())
    .action(async (image: string, o: { format?: string; output: string }) => {
      await withImage(image, o.format, async (chain) => {
        const j = await infoJson(chain);
        process.stdout.write((o.output === 'json' ? JSON.stringify(j, null, 2) : infoHuman(j)) + '\n');
      });
    });

  program
    .command('map')
    .description('show the guest → host mapping (same fields as qemu-img map --output=json)')
    .argument('<image>')
    .addOption(formatOption())
    .addOption(outputOption())
    .action(async (image: string, o: { format?: string; output: string }) => {
      await withImage(image, o.format, async (chain) => {
        const entries = await mapChain(chain);
        process.stdout.write((o.output === 'json' ? formatMapJson(entries) : formatMapHuman(entries, chain.paths)) + '\n');
      });
    });

  program
    .command('check')
    .description('check the image structure (exit 0 clean, 2 corrupt, 3 leaks only)')
    .argument('<image>')
    .addOption(formatOption())
    .addOption(outputOption())
    .action(async (image: string, o: { format?: string; output: string }) => {
      let code = 0;
      try {
        await withImage(image, o.format, async (chain) => {
          const top = chain.layers[0]!;
          const r = await checkImage(top);
          code = checkExitCode(r);
          if (o.output === 'json') {
            process.stdout.write(
              JSON.stringify(
                {
                  filename: chain.paths[0],
                  format: r.format,
                  'check-errors': r.checkErrors,
                  corruptions: r.corruptions,
                  leaks: r.leaks,
                  ...(r.imageEndOffset !== undefined ? { 'image-end-offset': r.imageEndOffset } : {}),
                  ...(r.totalClusters !== undefined ? { 'total-clusters': r.totalClusters } : {}),
                  ...(r.allocatedClusters !== undefined ? { 'allocated-clusters': r.allocatedClusters } : {}),
                  ...(r.fragmentedClusters !== undefined ? { 'fragmented-clusters': r.fragmentedClusters } : {}),
                  ...(r.compressedClusters !== undefined ? { 'compressed-clusters': r.compressedClusters } : {}),
                  messages: r.messages,
                },
                null,
                2,
              ) + '\n',
            );
          } else {
            for (const m of r.messages) process.stdout.write(m + '\n');
            if (code === 0) process.stdout.write('No errors were found on the image.\n');
            else {
              if (r.corruptions) process.stdout.write(`\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
              if (r.leaks) process.stdout.write(`\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
            }
          }
        });
      } catch (e) {
        // A header that fails validation is a corrupt image, not an internal error.
        if (e instanceof FormatError) {
          process.stderr.write(`imgconv: ${e.message}\n`);
          code = 2;
        } else throw e;
      }
      process.exitCode = code;
    });

  program
    .command('plan')
    .description('show what an in-place conversion would do, without writing anything (several images: one table)')
    .argument('<image...>')
    .requiredOption('--to <fmt>', 'target format')
    .addOption(targetOptionsOption())
    .addOption(formatOption())
    .addOption(outputOption())
    .addOption(moveWindowOption())
    .action(async (images: string[], o: { to: string; options?: string[]; format?: string; output: string; moveWindow?: string }) => {
      const window = parseMoveWindow(o.moveWindow);
      const base = { to: o.to, options: parseTargetOptions(o.options), format: o.format, drivers: allDrivers, ...(window !== undefined ? { relocationWindow: window } : {}) };
      if (images.length > 1) {
        await planBatch(images, base, o.output);
        return;
      }
      const image = images[0]!;
      const p = await planConversion(image, base);
      process.stdout.write((o.output === 'json' ? JSON.stringify(p, null, 2) : planHuman(p)) + '\n');
    });

  program
    .command('inplace')
    .description('convert images to another format in place (metadata only; data stays where it is)')
    .argument('[image...]', 'one or more images (with --manifest, none: continue the manifest\'s batch)')
    .requiredOption('--to <fmt>', 'target format')
    .addOption(targetOptionsOption())
    .option('--dry-run', 'only print the plan')
    .addOption(formatOption())
    .addOption(outputOption())
    .addOption(
      new Option('--progress <mode>', 'progress on stderr: auto (a live view on a terminal, plain lines otherwise), plain, json (one object per line), none')
        .choices(PROGRESS_MODES)
        .default('auto'),
    )
    .option('-q, --quiet', 'print nothing but errors (--output json still prints the report)')
    .option('-j, --jobs <n>', 'images converted at once (default: one at a time per filesystem, filesystems in parallel)')
    .option('--manifest <file>', 'JSON-lines record of each image\'s state, written as the run goes; re-running with it resumes')
    .addOption(moveWindowOption())
    .action(async (images: string[], o: InplaceOptions) => {
      const window = parseMoveWindow(o.moveWindow);
      const base = { to: o.to, options: parseTargetOptions(o.options), format: o.format, drivers: allDrivers, ...(window !== undefined ? { relocationWindow: window } : {}) };
      if (images.length === 0 && o.manifest === undefined) throw new UsageError('inplace: name at least one image (or --manifest FILE to continue a batch)');
      if (images.length > 1 || o.manifest !== undefined || o.jobs !== undefined) {
        await inplaceBatch(images, base, o);
        return;
      }
      const image = images[0]!;
      if (o.dryRun) {
        const p = await planConversion(image, base);
        process.stdout.write((o.output === 'json' ? JSON.stringify(p, null, 2) : planHuman(p)) + '\n');
        return;
      }
      const reporter = await createReporter({
        mode: o.progress,
        quiet: o.quiet === true,
        stream: process.stderr,
        stdoutIsTTY: process.stdout.isTTY === true,
        env: process.env,
      });
      try {
        await reporter.begin(image, base);
        const r = await withStopSignals(
          () => reporter.stopping(),
          (signal) => convertInPlace(image, { ...base, signal, onProgress: (e) => reporter.progress(e) }),
        );
        await reporter.done(r);
        await reporter.close();
        if (o.output === 'json') process.stdout.write(JSON.stringify(r, null, 2) + '\n');
        else if (!o.quiet && !reporter.showsReport) {
          process.stdout.write(
            [
              `${image}: converted ${r.source.format} → ${r.steps ? `${r.steps[0]!.target.format} → ` : ''}${r.target.format} in place${r.steps ? ' (two steps)' : ''}`,
              `metadata written: ${humanSize(r.written.metadataBytes)} (${r.written.metadataBytes} bytes)`,
              `data moved: ${humanSize(r.written.dataBytes)} (${r.written.dataBytes} bytes)`,
              ...(r.written.compactionBytes ? [`moved to compact the file: ${humanSize(r.written.compactionBytes)} (${r.written.compactionBytes} bytes)`] : []),
              `old metadata reclaimed: ${humanSize(r.reclaimedBytes)}`,
              `file size: ${r.source.fileLength} → ${r.finalLength} bytes`,
              ...(r.companion ? [`open as ${r.target.format}: ${r.companion} (its data is ${image})`] : []),
              ...(r.adoption ? [`${image} is now ${r.target.format}; its data file ${r.adoption.dataFile} was adopted${r.steps ? ' as the raw disk (the first step)' : ''} and no longer exists by that name (${humanSize(r.adoption.zeroBytes)} zeroed where the image read zeros)`] : []),
              `verified: ${r.verified.join(', ')}`,
              ...(r.dropped.length ? [`not carried over: ${r.dropped.join(', ')}`] : []),
            ].join('\n') + '\n',
          );
        }
      } catch (e) {
        reporter.fail(e);
        await reporter.close();
        if (e instanceof ConversionFailedError) {
          process.exitCode = e.imageState === 'needs-recover' ? 4 : 1;
          return;
        }
        // The view or the JSON stream has said it; main() would print it a second time.
        if (reporter.showsErrors && e instanceof ImgconvError) {
          process.exitCode = 1;
          return;
        }
        throw e;
      }
    });

  program
    .command('recover')
    .description('finish or undo an interrupted conversion')
    .argument('<image>')
    .addOption(outputOption())
    .addOption(moveWindowOption("the interrupted conversion's, as its journal records it; else 64M"))
    .action(async (image: string, o: { output: string; moveWindow?: string }) => {
      // Without the option: the window the interrupted conversion ran with (its journal records it).
      const window = parseMoveWindow(o.moveWindow);
      const r = await recover(image, { drivers: allDrivers, ...(window !== undefined ? { relocationWindow: window } : {}) });
      process.stdout.write((o.output === 'json' ? JSON.stringify(r, null, 2) : `${image}: ${r.detail}${r.format ? ` (now ${r.format})` : ''}`) + '\n');
    });

  registerStreamCommands(program, allDrivers);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (e) {
    if (e instanceof ImgconvError) {
      process.stderr.write(`imgconv: ${e.message}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`imgconv: internal error: ${(e as Error).stack ?? e}\n`);
      process.exitCode = 70;
    }
  }
}
