/**
 * The interactive view rendered with ink-testing-library: every phase, the end of a conversion, a
 * failure and an interrupt, judged by the text a person would read (lastFrame()).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { cleanup, render } from 'ink-testing-library';
import { PHASES, type ConversionPlan, type ConversionReport, type Phase } from '../../src/engine/convert.js';
import { ConversionView, type ViewState } from '../../src/progress/view.js';
import { hostPictures, type HostLayout } from '../../src/progress/strip.js';
import type { Snapshot } from '../../src/progress/tracker.js';

afterEach(() => cleanup());

const MiB = 1 << 20;

const plan: ConversionPlan = {
  image: 'disk.qcow2',
  source: { format: 'qcow2', virtualSize: 64 * MiB, fileLength: 49 * MiB },
  target: { format: 'qed', parameters: { cluster_size: 4096, table_size: 4, header_size: 1 } },
  metadataBytes: 132 * 1024,
  moves: [],
  dataMoveBytes: 40 * MiB,
  compactionMoveBytes: 42 * MiB,
  peakExtraBytes: 42 * MiB,
  finalLength: 91 * MiB,
  dropped: [],
};

const report: ConversionReport = {
  ...plan,
  finalLength: 48 * MiB,
  written: { metadataBytes: 132 * 1024, dataBytes: 40 * MiB, compactionBytes: 42 * MiB },
  reclaimedBytes: 0,
  verified: ['probes as qed', 'virtual size unchanged', 'guest mapping identical', 'structure check clean'],
};

const before: HostLayout = {
  fileSize: 48 * MiB,
  ranges: [
    { start: 0, length: 512, role: 'header' },
    { start: 512, length: 2 * MiB, role: 'metadata' },
    { start: 2 * MiB, length: 40 * MiB, role: 'data' },
  ],
};
const after: HostLayout = {
  fileSize: 48 * MiB,
  ranges: [
    { start: 0, length: 4096, role: 'header' },
    { start: 4096, length: 44 * MiB, role: 'data' },
    { start: 44 * MiB, length: 4 * MiB, role: 'metadata' },
  ],
};

function snap(phase: Phase, bytesDone: number, bytesTotal: number, extra: Partial<Snapshot> = {}): Snapshot {
  return { phase, phaseIndex: PHASES.indexOf(phase) + 1, bytesDone, bytesTotal, rate: 0, etaSeconds: null, elapsedMs: 1500, phaseElapsedMs: 300, ...extra };
}

function frame(state: Partial<ViewState>): string {
  const { lastFrame } = render(<ConversionView state={{ image: 'disk.qcow2', to: 'qed', stopping: false, ...state }} />);
  return lastFrame() ?? '';
}

/** The row of a phase: its mark and name. */
function row(text: string, phase: Phase): string {
  const line = text.split('\n').find((l) => new RegExp(`^\\s*\\S ${phase}\\b`).test(l));
  if (!line) throw new Error(`no row for ${phase} in:\n${text}`);
  return line.trim();
}

describe('interactive view', () => {
  it('before the first engine event: the image, the target, analysis under way', () => {
    const f = frame({});
    expect(f).toContain('imgconv inplace disk.qcow2');
    expect(f).toContain('… → qed');
    expect(row(f, 'analyse')).toMatch(/^▸ analyse/);
    for (const p of PHASES.slice(1)) expect(row(f, p)).toMatch(new RegExp(`^· ${p}`));
  });

  for (const [i, phase] of PHASES.entries()) {
    it(`phase ${phase}: earlier ones ticked, it highlighted, later ones pending`, () => {
      const s = phase === 'move' ? snap('move', 16 * MiB, 40 * MiB, { rate: 100 * MiB, etaSeconds: 0.24 }) : phase === 'write' ? snap('write', 66 * 1024, 132 * 1024) : snap(phase, 0, 1);
      const f = frame({ plan, progress: s, host: hostPictures(before) });
      expect(f).toContain('qcow2 → qed');
      for (const [j, p] of PHASES.entries()) {
        const mark = j < i ? '✔' : j === i ? '▸' : '·';
        expect(row(f, p), `${p} while ${phase}`).toMatch(new RegExp(`^${mark} ${p}`));
      }
      expect(row(f, phase)).toContain('0.3 s'); // time in the phase
      expect(f).toContain('metadata to write 132.0 KiB');
      expect(f).toContain('data to move 40.0 MiB');
      expect(f).toContain('to move after the commit, compacting 42.0 MiB');
      expect(f).toContain('elapsed 1.5 s');
      expect(f).toMatch(/host file \(a cell is 819\.2 KiB\)\n {3}before H▒+█+·+\n/);
      expect(f).not.toContain('after  ');
      if (phase === 'move') {
        expect(f).toMatch(/█+░+ {2}40% 16\.0 MiB \/ 40\.0 MiB {2}100\.0 MiB\/s {2}ETA 0:01/);
      } else if (phase === 'write') {
        expect(f).toMatch(/█+░+ {2}50% 66\.0 KiB \/ 132\.0 KiB/);
      } else {
        expect(f).not.toMatch(/░/); // no byte bar for a phase without byte counts
      }
      if (phase === 'plan') expect(row(f, 'plan')).toContain('qed: cluster_size=4096, table_size=4, header_size=1');
      if (phase === 'reclaim') expect(row(f, 'reclaim')).toContain('about 42.0 MiB to move');
    });
  }

  it('done: every phase ticked, the counts of the report, both pictures and what was verified', () => {
    const f = frame({ plan, progress: snap('reclaim', 1, 1), host: hostPictures(before, after), outcome: { kind: 'done', report, elapsedMs: 3400 } });
    for (const p of PHASES) expect(row(f, p)).toMatch(new RegExp(`^✔ ${p}`));
    expect(f).toContain('✔ Converted qcow2 → qed in 3.4 s');
    expect(f).toMatch(/verified {2}✔ probes as qed\n {12,}✔ virtual size unchanged\n {12,}✔ guest mapping identical\n {12,}✔ structure check clean/);
    expect(f).toContain('metadata written 132.0 KiB   data moved 40.0 MiB   reclaimed 0 B\n');
    expect(f).toContain('moved to compact 42.0 MiB   file size 49.0 MiB → 48.0 MiB\n');
    const lines = f.split('\n');
    const b = lines.find((l) => l.includes('before '))!;
    const a = lines.find((l) => l.includes('after  '))!;
    expect(b).toMatch(/before H▒+█+·+$/);
    expect(a).toMatch(/after {2}H█+▓+$/);
    expect(f).toContain('host file (a cell is 819.2 KiB)\n');
    expect(f).toContain('H header  ▒ old tables  ▓ new tables  █ data  · free');
    for (const line of f.split('\n')) expect(line.length, line).toBeLessThanOrEqual(80); // fits an 80-column terminal
    expect(f).not.toContain('elapsed');
    expect(f).not.toMatch(/░/);
  });

  it('failure: the phase it failed in, the message, the state and the command that recovers', () => {
    const f = frame({
      image: 'my disk.qcow2',
      plan,
      progress: snap('write', 12 * 1024, 132 * 1024),
      outcome: { kind: 'failed', message: 'conversion failed before the commit point: EIO; clean-up failed', imageState: 'needs-recover', elapsedMs: 900 },
    });
    expect(row(f, 'move')).toMatch(/^✔ move/);
    expect(row(f, 'write')).toMatch(/^✘ write/);
    expect(row(f, 'commit')).toMatch(/^· commit/);
    expect(f).toContain('✘ Conversion failed during write (after 0.9 s)');
    expect(f).toContain('conversion failed before the commit point: EIO; clean-up failed');
    expect(f).toContain('image state: needs recovery');
    expect(f).toContain("to recover:  imgconv recover 'my disk.qcow2'");
    expect(f).not.toContain('░'); // no live bar once it is over
  });

  it('verification failure: rolled back, no recover command needed', () => {
    const f = frame({
      plan,
      progress: snap('verify', 0, 1),
      outcome: { kind: 'failed', message: 'the converted image failed verification (guest mapping differs)', imageState: 'rolled-back', elapsedMs: 900 },
    });
    expect(row(f, 'verify')).toMatch(/^✘ verify/);
    expect(f).toContain('✘ Conversion failed during verify');
    expect(f).toContain('image state: rolled back: disk.qcow2 is restored to its original format (qcow2)');
    expect(f).not.toContain('imgconv recover');
  });

  it('a refusal before anything was written says so (failure during analysis)', () => {
    const f = frame({ outcome: { kind: 'failed', message: 'disk.qcow2 is already qed; nothing to do', imageState: 'untouched', elapsedMs: 10 } });
    expect(row(f, 'analyse')).toMatch(/^✘ analyse/);
    expect(f).toContain('image state: untouched: disk.qcow2 is exactly as it was');
  });

  it('interrupt before the commit point: stopping safely, then exactly what state the image is in', () => {
    const stopping = frame({ plan, progress: snap('move', 8 * MiB, 40 * MiB), stopping: true });
    expect(stopping).toContain('Stopping safely: undoing what was written; the image keeps its original format');
    expect(row(stopping, 'move')).toMatch(/^▸ move/);
    const end = frame({
      plan,
      progress: snap('move', 8 * MiB, 40 * MiB),
      stopping: true,
      outcome: { kind: 'failed', message: 'cancelled before the commit point; disk.qcow2 is unchanged (qcow2)', imageState: 'untouched', elapsedMs: 1200 },
    });
    expect(end).toContain('■ Stopped safely: nothing was converted (after 1.2 s)');
    expect(end).toContain('cancelled before the commit point; disk.qcow2 is unchanged (qcow2)');
    expect(end).toContain('image state: untouched: disk.qcow2 is exactly as it was (qcow2)');
    expect(end).not.toContain('Stopping safely: undoing'); // the notice gives way to the verdict
    expect(end).not.toContain('imgconv recover');
  });

  it('interrupt after the commit point: the conversion is finished, and the verdict says why', () => {
    const stopping = frame({ plan, progress: snap('verify', 0, 1), stopping: true });
    expect(stopping).toContain('Stop requested after the commit point: finishing the conversion so the image ends consistent');
    const end = frame({ plan, progress: snap('reclaim', 1, 1), stopping: true, outcome: { kind: 'done', report, elapsedMs: 2000 } });
    expect(end).toContain('✔ Converted qcow2 → qed');
    expect(end).toContain('The stop came after the commit point, so the conversion was finished: the image is consistent.');
  });

  it('an interrupt that leaves a half-done conversion names the recover command', () => {
    const f = frame({
      plan,
      progress: snap('reclaim', 0, 1),
      stopping: true,
      outcome: { kind: 'failed', message: 'conversion committed but not finished (EIO); finish it with: imgconv recover disk.qcow2', imageState: 'needs-recover', elapsedMs: 2000 },
    });
    expect(f).toContain('✘ Conversion failed during reclaim');
    expect(f).toContain('to recover:  imgconv recover disk.qcow2');
  });
});
