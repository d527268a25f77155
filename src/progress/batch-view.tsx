/**
 * The interactive view of a batch (ink). A pure function of the batch snapshot: an overall bar
 * (images and bytes of image files), one line per image under way with its phase, the last images
 * finished, and at the end the result table with the images that need action. The reporter in
 * batch-interactive.tsx owns the state; tests render any snapshot with ink-testing-library.
 */
import { Box, Text, useStdout } from 'ink';
import type { ImageOutcome } from '../batch/run.js';
import { actionLines, alignColumns, imageLabel, OUTCOME_WORD, resultRow, summaryLine } from './batch-table.js';
import { limitsText, type ActiveImage, type BatchSnapshot } from './batch-state.js';
import { bytes, duration, speedAndEta } from './format.js';
import { BYTE_PHASES, percent } from './tracker.js';

export interface BatchViewState {
  batch: BatchSnapshot;
  stopping: boolean;
}

const OUTCOME_COLOR: Record<ImageOutcome, string> = {
  converted: 'green',
  skipped: 'green',
  refused: 'red',
  failed: 'red',
  'needs-recover': 'red',
  pending: 'yellow',
};
const OUTCOME_GLYPH: Record<ImageOutcome, string> = { converted: '✔', skipped: '✔', refused: '✘', failed: '✘', 'needs-recover': '✘', pending: '■' };

/** How many finished images the live view lists under the active ones. */
const RECENT = 3;

function fit(s: string, width: number): string {
  const chars = [...s];
  return chars.length <= width ? s + ' '.repeat(width - chars.length) : '…' + chars.slice(chars.length - width + 1).join('');
}

function bar(fraction: number, cells: number): [string, string] {
  const filled = Math.max(0, Math.min(cells, Math.round(fraction * cells)));
  return ['█'.repeat(filled), '░'.repeat(cells - filled)];
}

export function BatchView({ state }: { state: BatchViewState }) {
  const b = state.batch;
  const columns = useStdout().stdout.columns || 80;
  return (
    <Box flexDirection="column" paddingX={1}>
      <Text>
        <Text bold>imgconv inplace</Text> {b.imagesTotal} image{b.imagesTotal === 1 ? '' : 's'}{' '}
        <Text bold color="cyan">
          → {b.to || '…'}
        </Text>
        <Text dimColor>{b.limits ? `  ${limitsText(b.limits, b.filesystems)}` : ''}</Text>
      </Text>
      <Overall b={b} columns={columns} />
      {b.report ? <FinalTable b={b} columns={columns} /> : <Live b={b} columns={columns} />}
      {state.stopping && !b.report ? (
        <Box marginTop={1} flexDirection="column">
          <Text color="yellow" bold>
            ■ Stopping safely: no new image starts…
          </Text>
          <Text color="yellow">{'  conversions under way roll back, or finish if past their commit point'}</Text>
        </Box>
      ) : null}
      {b.manifest !== undefined ? <Text dimColor>manifest {b.manifest}</Text> : null}
    </Box>
  );
}

function Overall({ b, columns }: { b: BatchSnapshot; columns: number }) {
  const cells = Math.max(10, Math.min(30, columns - 62));
  const [full, empty] = bar(b.imagesTotal ? b.imagesDone / b.imagesTotal : 1, cells);
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text>
        <Text color="cyan">{full}</Text>
        <Text dimColor>{empty}</Text> {b.imagesDone}/{b.imagesTotal} images{'  '}
        {bytes(b.bytesDone)} of {bytes(b.bytesTotal)}
        {'  '}
        <Text dimColor>{duration(b.report?.elapsedMs ?? b.elapsedMs)}</Text>
      </Text>
      <Text dimColor>written so far {bytes(b.writtenBytes)} (data moved and new metadata)</Text>
    </Box>
  );
}

function ActiveRow({ a, nameWidth }: { a: ActiveImage; nameWidth: number }) {
  const s = a.progress;
  const what = a.recovering ? 'recovering an interrupted conversion' : s ? s.phase : 'checking';
  const counted = !a.recovering && s && BYTE_PHASES.has(s.phase) && s.bytesTotal > 0;
  const [full, empty] = counted ? bar(percent(s!) / 100, 10) : ['', ''];
  return (
    <Text>
      <Text color="cyan">▸ </Text>
      {fit(a.image.name, nameWidth)} <Text dimColor>{a.from ? `${a.from} →` : ''}</Text> <Text bold>{what.padEnd(8)}</Text>
      {counted ? (
        <Text>
          {' '}
          <Text color="cyan">{full}</Text>
          <Text dimColor>{empty}</Text> {String(percent(s!)).padStart(3)}%{speedAndEta(s!).map((x) => `  ${x}`).join('')}
        </Text>
      ) : null}
    </Text>
  );
}

/** As wide as the longest name shown, within what the terminal leaves. */
function nameColumn(names: string[], columns: number, reserved: number): number {
  const longest = Math.max(8, ...names.map((n) => [...n].length));
  return Math.max(8, Math.min(longest, 40, columns - reserved));
}

function Live({ b, columns }: { b: BatchSnapshot; columns: number }) {
  const recent = b.finished.slice(-RECENT);
  const nameWidth = nameColumn([...b.active.map((a) => a.image.name), ...recent.map(imageLabel)], columns, 56);
  return (
    <Box flexDirection="column" marginTop={1}>
      {b.active.map((a) => (
        <ActiveRow key={a.image.index} a={a} nameWidth={nameWidth} />
      ))}
      {b.active.length === 0 ? <Text dimColor>{b.imagesDone < b.imagesTotal ? 'starting…' : 'finishing…'}</Text> : null}
      {recent.map((r) => (
        <Text key={r.index} dimColor={r.outcome === 'converted' || r.outcome === 'skipped'}>
          <Text color={OUTCOME_COLOR[r.outcome]}>{OUTCOME_GLYPH[r.outcome]} </Text>
          {fit(imageLabel(r), nameWidth)} {OUTCOME_WORD[r.outcome]}
          {r.outcome === 'converted' ? ` in ${duration(r.elapsedMs)}` : ''}
        </Text>
      ))}
    </Box>
  );
}

function FinalTable({ b, columns }: { b: BatchSnapshot; columns: number }) {
  const report = b.report!;
  const rows = report.results.map(resultRow);
  const nameWidth = nameColumn(rows.map((r) => r.image), columns, 62);
  const lines = alignColumns([
    ['image', 'from → to', 'time', 'metadata', 'data moved'],
    ...rows.map((r) => [fit(r.image, nameWidth).trimEnd(), r.conversion, r.time, r.metadata, r.data]),
  ]);
  const width = Math.max(...lines.map((l) => [...l].length));
  const action = actionLines(report);
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text bold>
        {lines[0]!.padEnd(width)}
        {'  result'}
      </Text>
      {report.results.map((r, i) => (
        <Text key={r.index}>
          {lines[i + 1]!.padEnd(width)}
          {'  '}
          <Text color={OUTCOME_COLOR[r.outcome]}>
            {OUTCOME_GLYPH[r.outcome]} {rows[i]!.result}
          </Text>
        </Text>
      ))}
      <Box marginTop={1}>
        <Text bold color={report.ok ? 'green' : 'red'}>
          {report.ok ? '✔ ' : '✘ '}
          {summaryLine(report)}
        </Text>
      </Box>
      {action.length ? (
        <Box flexDirection="column">
          <Text bold>needs action:</Text>
          {action.map((l, i) => (
            <Text key={i}>{`  ${l}`}</Text>
          ))}
        </Box>
      ) : null}
    </Box>
  );
}
