/**
 * Plain and JSON progress driven by a replayed conversion on a fake clock, and the rule that picks
 * the output: exact lines, no escape bytes, the JSON schema, errors in every mode.
 */
import { describe, expect, it } from 'vitest';
import { ConversionFailedError, InterruptedConversionError, type ConversionReport, type Phase, type ProgressEvent } from '../../src/engine/convert.js';
import { UsageError } from '../../src/errors.js';
import { JsonReporter } from '../../src/progress/json.js';
import { PlainReporter } from '../../src/progress/plain.js';
import { resolveMode } from '../../src/progress/reporter.js';
import { imageStateOf } from '../../src/progress/state.js';
import { checkJsonEvents } from './json-events.js';

const MiB = 1 << 20;

const report: ConversionReport = {
  image: 'disk.qcow2',
  source: { format: 'qcow2', virtualSize: 64 * MiB, fileLength: 49 * MiB },
  target: { format: 'qed', parameters: { cluster_size: 4096 } },
  metadataBytes: 64 * 1024,
  moves: [],
  dataMoveBytes: 40 * MiB,
  compactionMoveBytes: 0,
  peakExtraBytes: 0,
  finalLength: 48 * MiB,
  dropped: [],
  written: { metadataBytes: 64 * 1024, dataBytes: 40 * MiB, compactionBytes: 0 },
  reclaimedBytes: 0,
  verified: ['probes as qed', 'structure check clean'],
};

/** A conversion as the engine reports it: 40 MiB moved in 4 KiB steps at 100 MiB/s, 16 table writes. */
function replay(onEvent: (e: ProgressEvent) => void, clock: { t: number }, until: Phase | 'end' = 'end'): void {
  const emit = (phase: Phase, bytesDone: number, bytesTotal: number) => onEvent({ phase, bytesDone, bytesTotal });
  const steps: [Phase, () => void][] = [
    ['analyse', () => (emit('analyse', 0, 1), (clock.t += 400))],
    ['plan', () => (emit('plan', 1, 1), (clock.t += 5))],
    [
      'move',
      () => {
        emit('move', 0, 40 * MiB);
        for (let done = 4096; done <= 40 * MiB; done += 4096) {
          clock.t += (4096 / (100 * MiB)) * 1000;
          emit('move', done, 40 * MiB);
        }
      },
    ],
    [
      'write',
      () => {
        emit('write', 0, 64 * 1024);
        for (let i = 1; i <= 16; i++) emit('write', i * 4096, 64 * 1024);
      },
    ],
    ['commit', () => (emit('commit', 0, 1), emit('commit', 1, 1))],
    ['verify', () => (emit('verify', 0, 1), (clock.t += 200), emit('verify', 1, 1))],
    ['reclaim', () => (emit('reclaim', 0, 1), (clock.t += 100), emit('reclaim', 1, 1))],
  ];
  for (const [p, run] of steps) {
    run();
    if (p === until) return;
  }
}

function collect() {
  let out = '';
  return { write: (s: string) => void (out += s), text: () => out };
}

describe('plain progress', () => {
  it('a line per phase and per 10% of bytes, rate and ETA, no escape bytes', async () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new PlainReporter(o.write, { progress: true }, () => clock.t);
    await r.begin('disk.qcow2');
    replay((e) => r.progress(e), clock);
    await r.done(report);
    const lines = o.text().split('\n').slice(0, -1);
    expect(o.text()).not.toContain('\x1b');
    expect(lines.filter((l) => /^imgconv: \[\d\/7\]/.test(l))).toEqual([
      'imgconv: [1/7] analyse',
      'imgconv: [2/7] plan',
      'imgconv: [3/7] move (40.0 MiB)',
      'imgconv: [4/7] write (64.0 KiB)',
      'imgconv: [5/7] commit',
      'imgconv: [6/7] verify',
      'imgconv: [7/7] reclaim',
    ]);
    const move = lines.filter((l) => l.startsWith('imgconv: move '));
    expect(move.map((l) => l.match(/move (\d+)%/)![1])).toEqual(['10', '20', '30', '40', '50', '60', '70', '80', '90', '100']);
    expect(move[4]).toBe('imgconv: move 50% (20.0 MiB of 40.0 MiB, 100.0 MiB/s, ETA 0:01)');
    expect(move[9]).toBe('imgconv: move 100% (40.0 MiB of 40.0 MiB, 100.0 MiB/s)');
    expect(lines.filter((l) => l.startsWith('imgconv: write ')).length).toBe(10);
    expect(lines[lines.length - 1]).toBe('imgconv: done in 1.1 s');
  });

  it('Ctrl-C and a failure: the stopping line, then the state in the words the CLI always used', async () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new PlainReporter(o.write, { progress: true }, () => clock.t);
    await r.begin('disk.qcow2');
    replay((e) => r.progress(e), clock, 'move');
    r.stopping();
    r.fail(new ConversionFailedError('untouched', 'cancelled before the commit point; disk.qcow2 is unchanged (qcow2)'));
    expect(o.text()).toContain(
      'imgconv: stopping safely (finishing or rolling back to a consistent point)...\n' +
        'imgconv: cancelled before the commit point; disk.qcow2 is unchanged (qcow2)\nimgconv: the image was left untouched\n',
    );
  });

  it('quiet: nothing but the errors', async () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new PlainReporter(o.write, { progress: false }, () => clock.t);
    await r.begin('disk.qcow2');
    replay((e) => r.progress(e), clock);
    r.stopping();
    await r.done(report);
    expect(o.text()).toBe('');
    r.fail(new ConversionFailedError('needs-recover', 'conversion failed after the commit point: EIO'));
    expect(o.text()).toBe('imgconv: conversion failed after the commit point: EIO\nimgconv: the image needs: imgconv recover disk.qcow2\n');
    // Other errors are main()'s to print, as for every command.
    r.fail(new UsageError('unknown format "floppy"'));
    expect(o.text()).not.toContain('floppy');
  });
});

describe('JSON progress', () => {
  it('a whole conversion: the schema, every phase in order, at most one event per percent, a final done', async () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new JsonReporter(o.write, () => clock.t);
    await r.begin('disk.qcow2');
    replay((e) => r.progress(e), clock);
    await r.done(report);
    const events = checkJsonEvents(o.text());
    expect(events.filter((e) => e.event === 'phase').map((e) => e.phase)).toEqual(['analyse', 'plan', 'move', 'write', 'commit', 'verify', 'reclaim']);
    const move = events.filter((e) => e.event === 'progress' && e.phase === 'move');
    expect(move.length).toBe(100); // 10240 engine events, one per percent
    expect(move[49]).toMatchObject({ bytesDone: 20 * MiB, bytesTotal: 40 * MiB, rate: 100 * MiB, etaSeconds: 0.2 });
    expect(move[99]).toMatchObject({ bytesDone: 40 * MiB, etaSeconds: 0 });
    const done = events[events.length - 1]!;
    expect(done).toMatchObject({ event: 'done', image: 'disk.qcow2', source: 'qcow2', target: 'qed', dataBytes: 40 * MiB, finalLength: 48 * MiB, verified: report.verified });
  });

  it('a heartbeat at least once a second while the percent stands still', () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new JsonReporter(o.write, () => clock.t);
    r.progress({ phase: 'move', bytesDone: 0, bytesTotal: 1000 * MiB });
    for (let i = 1; i <= 30; i++) {
      clock.t += 400;
      r.progress({ phase: 'move', bytesDone: i * 1024, bytesTotal: 1000 * MiB });
    }
    const events = o.text().trim().split('\n').map((l) => JSON.parse(l) as { event: string; elapsedMs: number });
    expect(events.length).toBe(1 + 10); // 12 s: a heartbeat every third event (1.2 s)
    for (let i = 1; i < events.length; i++) expect(events[i]!.elapsedMs - events[i - 1]!.elapsedMs).toBeLessThanOrEqual(1200);
  });

  it('interrupt and failure: a stopping event, then an error with the state and the recover command', async () => {
    const clock = { t: 0 };
    const o = collect();
    const r = new JsonReporter(o.write, () => clock.t);
    await r.begin('my disk.qcow2');
    replay((e) => r.progress(e), clock, 'commit');
    r.stopping();
    r.fail(new ConversionFailedError('needs-recover', 'conversion failed after the commit point: EIO'));
    const events = checkJsonEvents(o.text());
    expect(events.at(-2)).toMatchObject({ event: 'stopping', phase: 'commit' });
    expect(events.at(-1)).toMatchObject({ event: 'error', phase: 'commit', imageState: 'needs-recover', recover: "imgconv recover 'my disk.qcow2'", message: 'conversion failed after the commit point: EIO' });
  });

  it('a refusal before any phase: an error event with phase null and the image untouched', async () => {
    const o = collect();
    const r = new JsonReporter(o.write, () => 0);
    await r.begin('disk.qed');
    r.fail(new UsageError('disk.qed is already qed; nothing to do'));
    const [e] = checkJsonEvents(o.text());
    expect(e).toMatchObject({ event: 'error', phase: null, bytesDone: 0, bytesTotal: 0, imageState: 'untouched', recover: null });
  });

  it('an internal error says so and does not guess the state', () => {
    const o = collect();
    const r = new JsonReporter(o.write, () => 0);
    r.fail(new TypeError('x is undefined'));
    const [e] = checkJsonEvents(o.text());
    expect(e).toMatchObject({ event: 'error', message: 'internal error: x is undefined', imageState: null, recover: null });
  });
});

describe('which output', () => {
  const tty = { mode: 'auto' as const, quiet: false, isTTY: true, env: {} };
  it('auto: the view on a terminal, plain lines elsewhere, in CI and on a dumb terminal', () => {
    expect(resolveMode(tty)).toBe('ink');
    expect(resolveMode({ ...tty, isTTY: false })).toBe('plain');
    expect(resolveMode({ ...tty, env: { CI: 'true' } })).toBe('plain');
    expect(resolveMode({ ...tty, env: { CI: '1' } })).toBe('plain');
    expect(resolveMode({ ...tty, env: { CONTINUOUS_INTEGRATION: 'yes' } })).toBe('plain');
    expect(resolveMode({ ...tty, env: { CI: 'false' } })).toBe('ink');
    expect(resolveMode({ ...tty, env: { CI: '0' } })).toBe('ink');
    expect(resolveMode({ ...tty, env: { TERM: 'dumb' } })).toBe('plain');
  });
  it('an explicit mode wins, --quiet wins over all', () => {
    expect(resolveMode({ ...tty, mode: 'json' })).toBe('json');
    expect(resolveMode({ ...tty, mode: 'plain' })).toBe('plain');
    expect(resolveMode({ ...tty, mode: 'none' })).toBe('none');
    expect(resolveMode({ ...tty, isTTY: false, mode: 'json', quiet: true })).toBe('none');
  });
  it('the state of the image after each kind of error', () => {
    expect(imageStateOf(new ConversionFailedError('rolled-back', 'x'))).toBe('rolled-back');
    expect(imageStateOf(new InterruptedConversionError('x'))).toBe('needs-recover');
    expect(imageStateOf(new UsageError('x'))).toBe('untouched');
    expect(imageStateOf(new Error('x'))).toBeUndefined();
  });
});
