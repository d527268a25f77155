/**
 * The ink reporter: owns the view's state, reads what the view shows beyond the engine's events
 * (the plan, the host file before and after) and re-renders. Loaded only through createReporter's
 * dynamic import, with ink and react.
 */
import { render, type Instance } from 'ink';
import { planConversion, type ConversionReport, type ConvertOptions, type ProgressEvent } from '../engine/convert.js';
import { openImage } from '../image.js';
import type { FormatDriver } from '../driver.js';
import type { ProgressReporter } from './reporter.js';
import { errorMessage, imageStateOf } from './state.js';
import { hostPictures, type HostLayout } from './strip.js';
import { ProgressTracker } from './tracker.js';
import { ConversionView, type ViewState } from './view.js';

/** Within a phase, a new frame at most this often: each frame costs ~10 ms of layout, ANSI work and terminal output. */
const FRAME_MS = 200;
/** A phase without byte counts (reclaim compacts for seconds) still shows its clock moving. */
const TICK_MS = 1000;

/** The host file's ranges, read only (the same opening `imgconv info` does). */
export async function readHostLayout(path: string, drivers: readonly FormatDriver[], format?: string): Promise<HostLayout> {
  const chain = await openImage(path, { drivers, format, backing: false });
  try {
    const hs = await chain.layers[0]!.hostSpace();
    return { fileSize: hs.fileSize, ranges: hs.ranges().map((r) => ({ start: r.start, length: r.length, role: r.role })) };
  } finally {
    await chain.close();
  }
}

export class InkReporter implements ProgressReporter {
  readonly showsErrors = true;
  readonly showsReport: boolean;
  private state: ViewState = { image: '', to: '', stopping: false };
  private readonly tracker = new ProgressTracker();
  private instance: Instance | undefined;
  private lastFrame = 0;
  private before: HostLayout | undefined;
  private drivers: readonly FormatDriver[] = [];
  private ticker: NodeJS.Timeout | undefined;

  constructor(
    private readonly stream: NodeJS.WriteStream,
    opts: { showsReport: boolean },
  ) {
    this.showsReport = opts.showsReport;
  }

  private update(patch: Partial<ViewState>): void {
    this.state = { ...this.state, ...patch };
    this.lastFrame = performance.now();
    const node = <ConversionView state={this.state} />;
    if (this.instance) this.instance.rerender(node);
    else {
      this.instance = render(node, {
        stdout: this.stream,
        stderr: this.stream,
        // Ctrl-C stays a signal (no raw mode): the CLI turns it into the conversion's AbortSignal.
        exitOnCtrlC: false,
        patchConsole: false,
        // Frames are paced here (FRAME_MS, and at once for a new phase, a stop or the end); ink's own
        // 30 fps throttle could otherwise drop a short-lived frame such as "stopping safely".
        maxFps: 1000,
      });
    }
  }

  async begin(image: string, opts: ConvertOptions): Promise<void> {
    this.drivers = opts.drivers;
    this.update({ image, to: opts.to });
    this.ticker = setInterval(() => this.update({ progress: this.tracker.snapshot() }), TICK_MS).unref();
    const plan = await planConversion(image, opts);
    this.update({ plan });
    try {
      this.before = await readHostLayout(image, opts.drivers, opts.format);
      this.update({ host: hostPictures(this.before) });
    } catch {
      // The picture is a nicety: planning read the same structures, so this hardly fails.
    }
  }

  progress(e: ProgressEvent): void {
    const begins = this.tracker.update(e);
    // The engine reports every moved cluster; most events only advance the tracker.
    if (begins || e.bytesDone === e.bytesTotal || performance.now() - this.lastFrame >= FRAME_MS) this.update({ progress: this.tracker.snapshot() });
  }

  stopping(): void {
    this.update({ stopping: true, progress: this.tracker.snapshot() });
  }

  async done(report: ConversionReport): Promise<void> {
    clearInterval(this.ticker);
    let host = this.state.host;
    if (this.before) {
      try {
        host = hostPictures(this.before, await readHostLayout(report.image, this.drivers, report.target.format));
      } catch {
        // Keep the before picture alone.
      }
    }
    this.update({ progress: this.tracker.snapshot(), host, outcome: { kind: 'done', report, elapsedMs: this.tracker.elapsedMs() } });
  }

  fail(error: unknown): void {
    clearInterval(this.ticker);
    this.update({
      progress: this.tracker.snapshot(),
      outcome: { kind: 'failed', message: errorMessage(error), imageState: imageStateOf(error), elapsedMs: this.tracker.elapsedMs() },
    });
  }

  async close(): Promise<void> {
    clearInterval(this.ticker);
    if (!this.instance) return;
    // Every update() was drawn at once; unmounting leaves the last frame on the terminal.
    this.instance.unmount();
    await this.instance.waitUntilExit();
  }
}
