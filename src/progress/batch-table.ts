/**
 * The batch's tables as text: the final table of a run (image, from → to, time, metadata written,
 * data moved, result) with the list of images that need action, and the dry run's plan table with
 * the space each filesystem needs. The plain report on stdout prints these; the interactive view
 * shows the same rows.
 */
import type { BatchPlan, PlanRow } from '../batch/plan.js';
import type { BatchReport, ImageOutcome, ImageResult } from '../batch/run.js';
import { bytes, duration, shellQuote } from './format.js';

export const OUTCOME_WORD: Record<ImageOutcome, string> = {
  converted: 'converted',
  skipped: 'skipped',
  refused: 'refused',
  failed: 'failed',
  'needs-recover': 'needs recover',
  pending: 'pending',
};

export interface TableRow {
  image: string;
  conversion: string;
  time: string;
  metadata: string;
  data: string;
  result: string;
}

export const RESULT_HEADER: TableRow = { image: 'image', conversion: 'from → to', time: 'time', metadata: 'metadata written', data: 'data moved', result: 'result' };

export function imageLabel(r: { image: string; aliases: string[] }): string {
  return r.aliases.length ? `${r.image} (= ${r.aliases.join(', ')})` : r.image;
}

export function resultRow(r: ImageResult): TableRow {
  const converted = r.outcome === 'converted' && r.report;
  return {
    image: imageLabel(r),
    conversion: `${r.from ?? '?'} → ${r.to}`,
    time: r.elapsedMs > 0 && r.outcome !== 'skipped' ? duration(r.elapsedMs) : '—',
    metadata: converted ? bytes(r.report!.written.metadataBytes) : '—',
    data: converted ? bytes(r.report!.written.dataBytes + r.report!.written.compactionBytes) : '—',
    result: r.outcome === 'skipped' && r.note ? `skipped (${r.note})` : OUTCOME_WORD[r.outcome],
  };
}

/** Columns padded to their widest cell; the last column is not padded. */
export function alignColumns(rows: string[][], gap = '  '): string[] {
  const widths: number[] = [];
  for (const row of rows) row.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, [...c].length)));
  return rows.map((row) => row.map((c, i) => (i === row.length - 1 ? c : c + ' '.repeat(widths[i]! - [...c].length))).join(gap).trimEnd());
}

/** One line per image that is not converted: what happened and what to do. */
export function actionLines(report: BatchReport): string[] {
  const out: string[] = [];
  for (const r of report.results) {
    if (r.outcome === 'converted' || r.outcome === 'skipped') continue;
    const what =
      r.outcome === 'needs-recover'
        ? `needs recovery (${r.reason ?? 'interrupted'}); run: ${r.recoverCommand ?? `imgconv recover ${shellQuote(r.path)}`}`
        : r.outcome === 'pending'
          ? `pending (${r.reason ?? 'not converted'}); run the batch again${report.manifest ? ' with the same --manifest' : ''}`
          : `${OUTCOME_WORD[r.outcome]}: ${r.reason ?? 'no reason given'}${r.imageState && r.imageState !== 'untouched' ? ` (image ${r.imageState})` : ''}`;
    out.push(`${imageLabel(r)}: ${what}`);
  }
  return out;
}

export function summaryLine(report: BatchReport): string {
  const c = report.counts;
  const parts = [`${c.converted} converted`];
  if (c.skipped) parts.push(`${c.skipped} already ${report.to}`);
  for (const k of ['refused', 'failed', 'needs-recover', 'pending'] as const) if (c[k]) parts.push(`${c[k]} ${OUTCOME_WORD[k]}`);
  return `${report.results.length} image${report.results.length === 1 ? '' : 's'} → ${report.to}: ${parts.join(', ')}${report.interrupted ? ' (stopped early)' : ''} in ${duration(report.elapsedMs)}`;
}

/** The plain report of a run, for stdout. */
export function formatBatchReport(report: BatchReport): string {
  const rows = [RESULT_HEADER, ...report.results.map(resultRow)].map((r) => [r.image, r.conversion, r.time, r.metadata, r.data, r.result]);
  const lines = [...alignColumns(rows), '', summaryLine(report)];
  const action = actionLines(report);
  if (action.length) lines.push('needs action:', ...action.map((l) => `  ${l}`));
  if (report.manifest) lines.push(`manifest: ${report.manifest}`);
  return lines.join('\n') + '\n';
}

function planResult(r: PlanRow): string {
  switch (r.outcome) {
    case 'convert':
      return 'convert';
    case 'skip':
      return `skip (${r.reason})`;
    case 'needs-recover':
      return 'recover first';
    case 'refused':
      return 'refused';
  }
}

/** The dry run's table: per image what would move and the peak extra space, totals, space per filesystem, refusals. */
export function formatBatchPlan(plan: BatchPlan): string {
  const head = ['image', 'from → to', 'metadata to write', 'data to move', 'peak extra space', 'result'];
  const rows = plan.rows.map((r) => [
    imageLabel(r),
    `${r.from ?? '?'} → ${r.to}`,
    r.plan ? bytes(r.plan.metadataBytes) : '—',
    r.plan ? bytes(r.plan.dataMoveBytes + r.plan.compactionMoveBytes) : '—',
    r.plan ? bytes(r.plan.peakExtraBytes) : '—',
    planResult(r),
  ]);
  const total = ['total', '', bytes(plan.totalMetadataBytes), bytes(plan.totalMoveBytes), bytes(plan.totalPeakExtraBytes), `${plan.counts.convert} of ${plan.rows.length} to convert`];
  const lines = alignColumns([head, ...rows, total]);
  if (plan.filesystems.length) lines.push('');
  for (const fs of plan.filesystems) {
    const free = fs.freeBytes;
    const verdict = free === undefined ? 'free space unknown' : free >= fs.peakExtraBytes ? `${bytes(free)} free: enough` : `${bytes(free)} free: NOT ENOUGH`;
    lines.push(`filesystem of ${fs.example}: ${fs.images} image${fs.images === 1 ? '' : 's'} need up to ${bytes(fs.peakExtraBytes)} more (${fs.peakExtraBytes} bytes); ${verdict}`);
  }
  const notes = plan.rows.filter((r) => r.outcome === 'refused' || r.outcome === 'needs-recover');
  if (notes.length) {
    lines.push('', 'will not convert:');
    for (const r of notes) lines.push(`  ${imageLabel(r)}: ${r.outcome === 'refused' ? 'refused: ' : ''}${r.reason}`);
  }
  return lines.join('\n') + '\n';
}
