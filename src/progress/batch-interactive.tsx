/**
 * The ink reporter of a batch: folds the runner's events into a snapshot and re-renders, at most
 * every FRAME_MS within a phase, at once when an image starts or ends, on a stop and at the end.
 * Loaded only through createBatchReporter's dynamic import, with ink and react.
 */
import { render, type Instance } from 'ink';
import type { BatchEvent } from '../batch/run.js';
import type { BatchProgressReporter } from './batch-reporter.js';
import { BatchTracker } from './batch-state.js';
import { BatchView, type BatchViewState } from './batch-view.js';

const FRAME_MS = 200;
const TICK_MS = 1000;

export class BatchInkReporter implements BatchProgressReporter {
  readonly showsReport: boolean;
  private readonly tracker = new BatchTracker();
  private stoppingNow = false;
  private instance: Instance | undefined;
  private lastFrame = 0;
  private readonly ticker: NodeJS.Timeout;

  constructor(
    private readonly stream: NodeJS.WriteStream,
    opts: { showsReport: boolean },
  ) {
    this.showsReport = opts.showsReport;
    this.ticker = setInterval(() => this.draw(), TICK_MS).unref();
  }

  private draw(): void {
    this.lastFrame = performance.now();
    const state: BatchViewState = { batch: this.tracker.snapshot(), stopping: this.stoppingNow };
    const node = <BatchView state={state} />;
    if (this.instance) this.instance.rerender(node);
    else this.instance = render(node, { stdout: this.stream, stderr: this.stream, exitOnCtrlC: false, patchConsole: false, maxFps: 1000 });
  }

  event(e: BatchEvent): void {
    this.tracker.update(e);
    if (e.type !== 'image-progress' || performance.now() - this.lastFrame >= FRAME_MS || e.event.bytesDone === e.event.bytesTotal) this.draw();
  }

  stopping(): void {
    this.stoppingNow = true;
    this.draw();
  }

  async close(): Promise<void> {
    clearInterval(this.ticker);
    if (!this.instance) return;
    this.draw();
    this.instance.unmount();
    await this.instance.waitUntilExit();
  }
}
