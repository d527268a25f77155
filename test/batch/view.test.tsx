/**
 * The batch outputs fed the same scripted run of events (a fake clock): the interactive view
 * (ink-testing-library) while images run and at the end, the plain lines and the JSON events —
 * each must carry the same facts, tagged by image.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { cleanup, render } from 'ink-testing-library';
import type { BatchEvent, BatchImage, BatchReport, ImageResult } from '../../src/batch/run.js';
import type { ConversionReport } from '../../src/engine/convert.js';
import { BatchTracker } from '../../src/progress/batch-state.js';
import { BatchView } from '../../src/progress/batch-view.js';
import { BatchPlainReporter } from '../../src/progress/batch-plain.js';
import { BatchJsonReporter } from '../../src/progress/batch-json.js';
import { formatBatchReport } from '../../src/progress/batch-table.js';
import { checkJsonEvents } from '../progress/json-events.js';

afterEach(() => cleanup());

const MiB = 1 << 20;
const img = (index: number, name: string, size: number): BatchImage => ({ index, name, path: `/vm/${name}`, aliases: [], device: '2049', size });
const web = img(0, 'web.vmdk', 9 * MiB);
const db = img(1, 'db.vhd', 17 * MiB);
const old = img(2, 'old.qcow2', 2 * MiB);
const later = img(3, 'later.raw', 4 * MiB);

function conversion(image: BatchImage, source: string, dataBytes: number): ConversionReport {
  return {
    image: image.path,
    source: { format: source, virtualSize: 64 * MiB, fileLength: image.size },
    target: { format: 'qed', parameters: { cluster_size: 65536, table_size: 4, header_size: 1 } },
    metadataBytes: 576 * 1024,
    moves: [],
    dataMoveBytes: dataBytes,
    compactionMoveBytes: 0,
    peakExtraBytes: 0,
    finalLength: image.size,
    dropped: [],
    written: { metadataBytes: 576 * 1024, dataBytes, compactionBytes: 0 },
    reclaimedBytes: 0,
    verified: ['probes as qed'],
  };
}

const results: ImageResult[] = [
  { index: 0, image: web.name, path: web.path, aliases: [], outcome: 'converted', from: 'vmdk', to: 'qed', elapsedMs: 1200, report: conversion(web, 'vmdk', 0) },
  { index: 1, image: db.name, path: db.path, aliases: [], outcome: 'converted', from: 'vhd', to: 'qed', elapsedMs: 3400, report: conversion(db, 'vhd', 14 * MiB) },
  { index: 2, image: old.name, path: old.path, aliases: [], outcome: 'refused', from: 'qcow2', to: 'qed', elapsedMs: 20, reason: 'qcow2: unsupported internal snapshots: 1 internal snapshot(s)', imageState: 'untouched' },
  { index: 3, image: later.name, path: later.path, aliases: [], outcome: 'pending', to: 'qed', elapsedMs: 0, reason: 'not started: the run was stopped', imageState: 'untouched' },
];
const report: BatchReport = {
  to: 'qed',
  results,
  counts: { converted: 2, skipped: 0, refused: 1, failed: 0, 'needs-recover': 0, pending: 1 },
  ok: false,
  interrupted: true,
  manifest: '/vm/batch.jsonl',
  elapsedMs: 4700,
};

/** A scripted run: web and db convert side by side (two filesystems), old is refused, later never starts. */
function script(): BatchEvent[] {
  const p = (image: BatchImage, phase: 'analyse' | 'move' | 'write' | 'commit', bytesDone: number, bytesTotal: number): BatchEvent => ({ type: 'image-progress', image, event: { phase, bytesDone, bytesTotal } });
  return [
    { type: 'start', to: 'qed', images: [web, db, old, later], limits: { total: Infinity, perLane: 1 }, filesystems: 2, manifest: '/vm/batch.jsonl' },
    { type: 'image-start', image: web },
    { type: 'image-start', image: db },
    { type: 'image-convert', image: web, from: 'vmdk' },
    { type: 'image-convert', image: db, from: 'vhd' },
    p(web, 'analyse', 0, 1),
    p(db, 'analyse', 0, 1),
    p(db, 'move', 0, 14 * MiB),
    p(db, 'move', 7 * MiB, 14 * MiB),
    p(web, 'write', 0, 576 * 1024),
    p(web, 'write', 576 * 1024, 576 * 1024),
    p(web, 'commit', 0, 1),
    { type: 'image-end', image: web, result: results[0]! },
    { type: 'image-start', image: old },
    { type: 'image-convert', image: old, from: 'qcow2' },
    p(old, 'analyse', 0, 1),
    { type: 'image-end', image: old, result: results[2]! },
    p(db, 'move', 14 * MiB, 14 * MiB),
    { type: 'image-end', image: db, result: results[1]! },
    { type: 'image-end', image: later, result: results[3]! },
    { type: 'end', report },
  ];
}

function clock() {
  let t = 0;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

describe('batch view (ink)', () => {
  it('while running: the overall bar in images and bytes, a line per active image with its phase and bar', () => {
    const c = clock();
    const tracker = new BatchTracker(c.now);
    const events = script();
    for (const e of events.slice(0, 13)) {
      tracker.update(e);
      c.advance(100);
    }
    const { lastFrame } = render(<BatchView state={{ batch: tracker.snapshot(), stopping: false }} />);
    const f = lastFrame()!;
    expect(f).toContain('imgconv inplace 4 images → qed  one at a time per filesystem (2 filesystems)');
    expect(f).toMatch(/1\/4 images {2}9\.0 MiB of 32\.0 MiB/);
    expect(f).toMatch(/written so far 7\.6 MiB/); // 7 MiB moved by db + 576 KiB of web's tables
    expect(f).toMatch(/▸ db\.vhd\s+vhd → move\s+█████░░░░░ {2}50%/);
    expect(f).not.toMatch(/▸ web\.vmdk/);
    expect(f).toMatch(/✔ web\.vmdk\s+converted in 1\.2 s/);
    expect(f).toContain('manifest /vm/batch.jsonl');
  });

  it('stopping: says what happens to the images under way', () => {
    const tracker = new BatchTracker(clock().now);
    for (const e of script().slice(0, 9)) tracker.update(e);
    const { lastFrame } = render(<BatchView state={{ batch: tracker.snapshot(), stopping: true }} />);
    expect(lastFrame()).toMatch(/■ Stopping safely: no new image starts…\n\s+conversions under way roll back, or finish if past their commit point/);
  });

  it('at the end: the table (image, from → to, time, metadata, data moved, result), the summary and what needs action', () => {
    const tracker = new BatchTracker(clock().now);
    for (const e of script()) tracker.update(e);
    const { lastFrame } = render(<BatchView state={{ batch: tracker.snapshot(), stopping: true }} />);
    const f = lastFrame()!;
    expect(f).toMatch(/image\s+from → to\s+time\s+metadata\s+data moved\s+result/);
    expect(f).toMatch(/web\.vmdk\s+vmdk → qed\s+1\.2 s\s+576\.0 KiB\s+0 B\s+✔ converted/);
    expect(f).toMatch(/db\.vhd\s+vhd → qed\s+3\.4 s\s+576\.0 KiB\s+14\.0 MiB\s+✔ converted/);
    expect(f).toMatch(/old\.qcow2\s+qcow2 → qed\s+0\.0 s\s+—\s+—\s+✘ refused/);
    expect(f).toMatch(/later\.raw\s+\? → qed\s+—\s+—\s+—\s+■ pending/);
    expect(f).toContain('✘ 4 images → qed: 2 converted, 1 refused, 1 pending (stopped early) in 4.7 s');
    expect(f).toMatch(/needs action:\n\s+old\.qcow2: refused: qcow2: unsupported internal snapshots/);
    expect(f).toMatch(/later\.raw: pending \(not started: the run was stopped\); run the batch again with the same\s+--manifest/);
    expect(f).not.toContain('Stopping safely');
  });
});

describe('plain and JSON outputs of the same run', () => {
  it('plain: every line tagged by image or about the batch, no escapes; the report table on stdout', () => {
    const lines: string[] = [];
    const c = clock();
    const r = new BatchPlainReporter((t) => lines.push(t), { progress: true }, c.now);
    for (const e of script()) {
      r.event(e);
      c.advance(100);
    }
    const text = lines.join('');
    expect(text).not.toMatch(/\x1b/);
    expect(text).toContain('imgconv: 4 images → qed, one at a time per filesystem (2 filesystems); manifest /vm/batch.jsonl\n');
    expect(text).toContain('imgconv: db.vhd: [3/7] move (14.0 MiB)\n');
    expect(text).toContain('imgconv: db.vhd: move 50% (7.0 MiB of 14.0 MiB, ');
    expect(text).toContain('imgconv: [1/4 images, 9.0 MiB of 32.0 MiB] web.vmdk: converted vmdk → qed in 1.2 s (metadata 576.0 KiB, data moved 0 B)\n');
    expect(text).toContain('imgconv: [2/4 images, 11.0 MiB of 32.0 MiB] old.qcow2: refused: qcow2: unsupported internal snapshots');
    expect(text).toContain('imgconv: [4/4 images, 32.0 MiB of 32.0 MiB] later.raw: pending: not started: the run was stopped\n');
    expect(text.trimEnd().split('\n').at(-1)).toBe('imgconv: 4 images → qed: 2 converted, 1 refused, 1 pending (stopped early) in 4.7 s');
    const table = formatBatchReport(report);
    expect(table.split('\n')[0]).toMatch(/^image\s+from → to\s+time\s+metadata written\s+data moved\s+result$/);
    expect(table).toMatch(/db\.vhd\s+vhd → qed\s+3\.4 s\s+576\.0 KiB\s+14\.0 MiB\s+converted/);
  });

  it('quiet (progress none): only the images that need action', () => {
    const lines: string[] = [];
    const r = new BatchPlainReporter((t) => lines.push(t), { progress: false }, clock().now);
    for (const e of script()) r.event(e);
    expect(lines).toEqual(['imgconv: old.qcow2: refused: qcow2: unsupported internal snapshots: 1 internal snapshot(s)\n', 'imgconv: later.raw: pending: not started: the run was stopped\n']);
  });

  it('JSON: each image its own valid single-conversion stream, tagged; batch events with image null', () => {
    const lines: string[] = [];
    const c = clock();
    const r = new BatchJsonReporter((l) => lines.push(l), c.now);
    for (const e of script()) {
      r.event(e);
      c.advance(100);
    }
    const events = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events[0]).toMatchObject({ event: 'batch-start', image: null, imagesTotal: 4, bytesTotal: 32 * MiB, target: 'qed', jobs: null, filesystems: 2 });
    expect(events.at(-1)).toMatchObject({ event: 'batch-end', image: null, imagesDone: 4, ok: false, interrupted: true, counts: report.counts });
    for (const image of [web, db, old, later]) {
      const own = lines.filter((l) => (JSON.parse(l) as { image: unknown }).image === image.name);
      // The single conversion's schema check holds for each image's own events.
      const checked = checkJsonEvents(own.join(''));
      for (const e of checked) expect(e.path).toBe(image.path);
    }
    const dbDone = events.find((e) => e.image === 'db.vhd' && e.event === 'done')!;
    expect(dbDone).toMatchObject({ outcome: 'converted', source: 'vhd', target: 'qed', dataBytes: 14 * MiB, metadataBytes: 576 * 1024 });
    expect(events.find((e) => e.image === 'old.qcow2' && e.event === 'error')).toMatchObject({ outcome: 'refused', imageState: 'untouched', recover: null });
    expect(events.find((e) => e.image === 'later.raw' && e.event === 'error')).toMatchObject({ outcome: 'pending', phase: null });
  });
});
