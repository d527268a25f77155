/**
 * The interactive view of `imgconv inplace` (ink). A pure function of ViewState: the reporter in
 * interactive.tsx owns the state and re-renders; tests render any state with ink-testing-library.
 */
import { Box, Text, useStdout } from 'ink';
import { PHASES, type ConversionPlan, type ConversionReport, type Phase } from '../engine/convert.js';
import { journalPath } from '../engine/journal.js';
import { bytes, duration, shellQuote, speedAndEta } from './format.js';
import type { ImageState } from './state.js';
import { CELL_GLYPH, CELL_LABEL, type HostCell } from './strip.js';
import { BYTE_PHASES, percent, type Snapshot } from './tracker.js';

export type Outcome =
  | { kind: 'done'; report: ConversionReport; elapsedMs: number }
  | { kind: 'failed'; message: string; imageState: ImageState | undefined; elapsedMs: number };

export interface ViewState {
  image: string;
  /** Target format as asked on the command line (the plan confirms it). */
  to: string;
  plan?: ConversionPlan;
  progress?: Snapshot;
  host?: { before: HostCell[]; after?: HostCell[]; bytesPerCell: number };
  /** Ctrl-C (SIGINT) or SIGTERM arrived. */
  stopping: boolean;
  outcome?: Outcome;
}

const PHASE_TEXT: Record<Phase, string> = {
  analyse: 'read the mapping and the free space',
  plan: 'lay out the new metadata',
  move: 'copy data that cannot stay where it is',
  write: 'write the new tables into free space',
  commit: 'switch the header (the commit point)',
  verify: 'reopen and check the new image',
  reclaim: 'compact and free the old tables',
};

const CELL_COLOR: Record<HostCell, string> = {
  header: 'magenta',
  'old-tables': 'yellow',
  'new-tables': 'cyan',
  data: 'green',
  free: 'gray',
};

/** The bar's width on a wide terminal; it narrows so its line (about 50 more columns) fits in 80. */
const BAR_CELLS = 30;
const COMMIT_INDEX = PHASES.indexOf('commit');

export function ConversionView({ state }: { state: ViewState }) {
  const { image, plan, progress, outcome } = state;
  const source = outcome?.kind === 'done' ? outcome.report.source.format : plan?.source.format;
  const target = outcome?.kind === 'done' ? outcome.report.target.format : (plan?.target.format ?? state.to);
  return (
    <Box flexDirection="column" paddingX={1}>
      <Text>
        <Text bold>imgconv inplace</Text> {image}
        {'  '}
        <Text bold color="cyan">
          {source ?? '…'} → {target}
        </Text>
      </Text>
      <Box flexDirection="column" marginTop={1}>
        {PHASES.map((p) => (
          <PhaseRow key={p} phase={p} state={state} />
        ))}
      </Box>
      <Counts plan={plan} outcome={outcome} />
      {state.host ? <HostPicture host={state.host} /> : null}
      {state.stopping && !outcome ? <Stopping state={state} /> : null}
      {outcome ? <Verdict state={state} outcome={outcome} source={source} target={target} /> : null}
      {!outcome && progress ? <Text dimColor>elapsed {duration(progress.elapsedMs)}</Text> : null}
    </Box>
  );
}

type Mark = 'done' | 'current' | 'failed' | 'pending';

function phaseMark(p: Phase, state: ViewState): Mark {
  const i = PHASES.indexOf(p);
  if (state.outcome?.kind === 'done') return 'done';
  // Before the first engine event the view is reading the image: that is analysis.
  const current = state.progress ? state.progress.phaseIndex - 1 : 0;
  if (i < current) return 'done';
  if (i > current) return 'pending';
  return state.outcome ? 'failed' : 'current';
}

const MARK_GLYPH: Record<Mark, string> = { done: '✔', current: '▸', failed: '✘', pending: '·' };
const MARK_COLOR: Record<Mark, string | undefined> = { done: 'green', current: 'cyan', failed: 'red', pending: undefined };

function PhaseRow({ phase, state }: { phase: Phase; state: ViewState }) {
  const mark = phaseMark(phase, state);
  const s = state.progress?.phase === phase ? state.progress : undefined;
  const detail =
    phase === 'plan' && state.plan
      ? `${state.plan.target.format}: ${Object.entries(state.plan.target.parameters)
          .map(([k, v]) => `${k}=${v}`)
          .join(', ')}`
      : phase === 'reclaim' && state.plan?.compactionMoveBytes
        ? `${PHASE_TEXT.reclaim} (about ${bytes(state.plan.compactionMoveBytes)} to move)`
        : PHASE_TEXT[phase];
  return (
    <Box flexDirection="column">
      <Text dimColor={mark === 'pending'}>
        <Text color={MARK_COLOR[mark]}>{MARK_GLYPH[mark]} </Text>
        <Text bold={mark === 'current'} color={mark === 'current' ? 'cyan' : mark === 'failed' ? 'red' : undefined}>
          {phase.padEnd(8)}
        </Text>
        {detail}
        {mark === 'current' && s ? <Text dimColor>{`  ${duration(s.phaseElapsedMs)}`}</Text> : null}
      </Text>
      {mark === 'current' && s && BYTE_PHASES.has(phase) && s.bytesTotal > 0 ? <Bar s={s} /> : null}
    </Box>
  );
}

function Bar({ s }: { s: Snapshot }) {
  const pct = percent(s);
  const cells = Math.max(10, Math.min(BAR_CELLS, (useStdout().stdout.columns || 80) - 62));
  const filled = Math.round((pct * cells) / 100);
  return (
    <Text>
      {'           '}
      <Text color="cyan">{'█'.repeat(filled)}</Text>
      <Text dimColor>{'░'.repeat(cells - filled)}</Text> {String(pct).padStart(3)}% {bytes(s.bytesDone)} / {bytes(s.bytesTotal)}
      {speedAndEta(s).map((x) => `  ${x}`).join('')}
    </Text>
  );
}

/** Two short lines, so they fit in 80 columns. */
function Counts({ plan, outcome }: { plan: ConversionPlan | undefined; outcome: Outcome | undefined }) {
  if (outcome?.kind === 'done') {
    const r = outcome.report;
    return (
      <Box flexDirection="column" marginTop={1}>
        <Text>
          metadata written <Text bold>{bytes(r.written.metadataBytes)}</Text>
          {'   '}data moved <Text bold>{bytes(r.written.dataBytes)}</Text>
          {'   '}reclaimed <Text bold>{bytes(r.reclaimedBytes)}</Text>
        </Text>
        <Text>
          {r.written.compactionBytes ? (
            <Text>
              moved to compact <Text bold>{bytes(r.written.compactionBytes)}</Text>
              {'   '}
            </Text>
          ) : null}
          file size {bytes(r.source.fileLength)} → {bytes(r.finalLength)}
        </Text>
      </Box>
    );
  }
  if (!plan) return null;
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text>
        metadata to write <Text bold>{bytes(plan.metadataBytes)}</Text>
        {'   '}data to move <Text bold>{bytes(plan.dataMoveBytes)}</Text>
      </Text>
      {plan.compactionMoveBytes ? (
        <Text>
          to move after the commit, compacting <Text bold>{bytes(plan.compactionMoveBytes)}</Text>
        </Text>
      ) : null}
    </Box>
  );
}

function Strip({ cells }: { cells: HostCell[] }) {
  const runs: { kind: HostCell; n: number }[] = [];
  for (const c of cells) {
    const last = runs[runs.length - 1];
    if (last && last.kind === c) last.n++;
    else runs.push({ kind: c, n: 1 });
  }
  return (
    <Text>
      {runs.map((r, i) => (
        <Text key={i} color={CELL_COLOR[r.kind]}>
          {CELL_GLYPH[r.kind].repeat(r.n)}
        </Text>
      ))}
    </Text>
  );
}

function HostPicture({ host }: { host: NonNullable<ViewState['host']> }) {
  const shown = new Set<HostCell>([...host.before, ...(host.after ?? [])]);
  const legend = (['header', 'old-tables', 'new-tables', 'data', 'free'] as const).filter((c) => shown.has(c));
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text>host file (a cell is {bytes(host.bytesPerCell)})</Text>
      <Text>
        {'  before '}
        <Strip cells={host.before} />
      </Text>
      {host.after ? (
        <Text>
          {'  after  '}
          <Strip cells={host.after} />
        </Text>
      ) : null}
      <Text dimColor>
        {'         '}
        {legend.map((c) => `${CELL_GLYPH[c]} ${CELL_LABEL[c]}`).join('  ')}
      </Text>
    </Box>
  );
}

function Stopping({ state }: { state: ViewState }) {
  const pastCommit = (state.progress?.phaseIndex ?? 0) - 1 >= COMMIT_INDEX;
  return (
    <Box marginTop={1}>
      <Text color="yellow" bold>
        {pastCommit
          ? '■ Stop requested after the commit point: finishing the conversion so the image ends consistent…'
          : '■ Stopping safely: undoing what was written; the image keeps its original format…'}
      </Text>
    </Box>
  );
}

function stateText(state: ImageState | undefined, image: string, source: string | undefined, target: string): string {
  const was = source ? ` (${source})` : '';
  switch (state) {
    case 'untouched':
      return `untouched: ${image} is exactly as it was${was}`;
    case 'rolled-back':
      return `rolled back: ${image} is restored to its original format${was}`;
    case 'converted':
      return `converted: ${image} is already ${target}`;
    case 'needs-recover':
      return `needs recovery: the conversion was interrupted half-way; ${image} is valid again once recover has run`;
    default:
      return `unknown (internal error): if ${journalPath(image)} exists run imgconv recover, then imgconv check`;
  }
}

function Verdict({ state, outcome, source, target }: { state: ViewState; outcome: Outcome; source: string | undefined; target: string }) {
  if (outcome.kind === 'done') {
    const r = outcome.report;
    return (
      <Box flexDirection="column" marginTop={1}>
        <Text color="green" bold>
          ✔ Converted {r.source.format} → {r.target.format} in {duration(outcome.elapsedMs)}
        </Text>
        {r.verified.map((v, i) => (
          <Text key={v}>
            {i ? '            ' : '  verified  '}
            <Text color="green">✔</Text> {v}
          </Text>
        ))}
        {r.dropped.length ? <Text>{`  not carried over: ${r.dropped.join(', ')}`}</Text> : null}
        {state.stopping ? <Text color="yellow">  The stop came after the commit point, so the conversion was finished: the image is consistent.</Text> : null}
      </Box>
    );
  }
  const cancelled = state.stopping && (outcome.imageState === 'untouched' || outcome.imageState === 'rolled-back');
  const phase = state.progress?.phase ?? 'analyse';
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text color={cancelled ? 'yellow' : 'red'} bold>
        {cancelled ? '■ Stopped safely: nothing was converted' : `✘ Conversion failed during ${phase}`} (after {duration(outcome.elapsedMs)})
      </Text>
      <Text>{`  ${outcome.message}`}</Text>
      <Text>
        {'  image state: '}
        <Text bold>{stateText(outcome.imageState, state.image, source, target)}</Text>
      </Text>
      {outcome.imageState === 'needs-recover' ? (
        <Text>
          {'  to recover:  '}
          <Text bold color="cyan">
            imgconv recover {shellQuote(state.image)}
          </Text>
        </Text>
      ) : null}
    </Box>
  );
}
