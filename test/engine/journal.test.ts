import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { decodeJournal, encodeRecord, featuresOf, journalState, JournalTooLargeError, MAX_JSON, undoOf, type JournalRecord, type Region } from '../../src/engine/journal.js';

const regionArb: fc.Arbitrary<Region> = fc.record({
  offset: fc.nat(2 ** 40),
  bytes: fc.uint8Array({ maxLength: 600 }),
});

const recordArb: fc.Arbitrary<JournalRecord> = fc.oneof(
  fc.record({
    type: fc.constant('prepare' as const),
    sourceFormat: fc.string(),
    targetFormat: fc.string(),
    originalLength: fc.nat(2 ** 50),
    sourceDigest: fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength: 64, maxLength: 64 }),
    undo: fc.array(regionArb, { maxLength: 4 }),
    plan: fc.dictionary(fc.string(), fc.oneof(fc.string(), fc.integer(), fc.boolean())),
  }),
  fc.record({ type: fc.constant('commit' as const), redo: fc.array(regionArb, { maxLength: 4 }), finalLength: fc.integer({ min: -1, max: 2 ** 50 }) }),
  fc.record({ type: fc.constant('done' as const) }),
  fc.record({ type: fc.constant('abort' as const), reason: fc.string() }),
);

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

describe('journal records', () => {
  test.prop([fc.array(recordArb, { maxLength: 4 })])('round-trip', (recs) => {
    const bytes = concat(recs.map(encodeRecord));
    const d = decodeJournal(bytes);
    expect(d.tornTail).toBe(false);
    // The encoder adds the features a record's fields need (none for most generated records).
    expect(d.records).toEqual(recs.map((r) => (featuresOf(r).length ? { ...r, features: featuresOf(r) } : r)));
  });

  test.prop([fc.array(recordArb, { minLength: 1, maxLength: 3 }), fc.nat()])('a torn tail leaves exactly the complete records', (recs, cutSeed) => {
    const encoded = recs.map(encodeRecord);
    const bytes = concat(encoded);
    const cut = cutSeed % (bytes.length + 1);
    const d = decodeJournal(bytes.subarray(0, cut));
    let complete = 0;
    let pos = 0;
    for (const e of encoded) {
      if (pos + e.length <= cut) complete++;
      pos += e.length;
    }
    expect(d.records.map((r) => ({ ...r, features: undefined }))).toEqual(recs.slice(0, complete).map((r) => ({ ...r, features: undefined })));
  });

  test.prop([fc.array(recordArb, { minLength: 1, maxLength: 3 }), fc.nat(), fc.integer({ min: 1, max: 255 })])(
    'a flipped byte never yields a record that was not written',
    (recs, at, xor) => {
      const bytes = concat(recs.map(encodeRecord));
      const i = at % bytes.length;
      bytes[i]! ^= xor;
      const d = decodeJournal(bytes);
      // every decoded record is one of the originals, in order, as a prefix
      expect(recs.slice(0, d.records.length).map((r) => ({ ...r, features: undefined }))).toEqual(d.records.map((r) => ({ ...r, features: undefined })));
      expect(d.records.length).toBeLessThan(recs.length + 1);
    },
  );

  it('derives the state from the records present', () => {
    const prepare: JournalRecord = { type: 'prepare', sourceFormat: 'qed', targetFormat: 'qcow2', originalLength: 1, sourceDigest: '0'.repeat(64), undo: [], plan: {} };
    const commit: JournalRecord = { type: 'commit', redo: [{ offset: 0, bytes: new Uint8Array([1, 2]) }], finalLength: -1 };
    expect(journalState(decodeJournal(new Uint8Array()))).toEqual({ state: 'none' });
    expect(journalState(decodeJournal(encodeRecord(prepare))).state).toBe('prepared');
    expect(journalState(decodeJournal(concat([encodeRecord(prepare), encodeRecord(commit)]))).state).toBe('committed');
    expect(journalState(decodeJournal(concat([encodeRecord(prepare), encodeRecord(commit), encodeRecord({ type: 'done' })]))).state).toBe('done');
    expect(journalState(decodeJournal(concat([encodeRecord(prepare), encodeRecord(commit), encodeRecord({ type: 'abort', reason: 'x' })]))).state).toBe('aborted');
    // a commit without a prepare is not a journal we wrote
    expect(journalState(decodeJournal(encodeRecord(commit))).state).toBe('none');
  });
});

describe('journal limits and steps', () => {
  const prep = (then?: { to: string; options: Record<string, string> }): JournalRecord => ({
    type: 'prepare',
    sourceFormat: 'qcow2',
    targetFormat: 'vmdk',
    originalLength: 1024,
    sourceDigest: 'd',
    undo: [{ offset: 0, bytes: new Uint8Array([1, 2]) }],
    plan: {},
    ...(then ? { then } : {}),
  });
  const commit = (undo?: Region[]): JournalRecord => ({ type: 'commit', redo: [{ offset: 0, bytes: new Uint8Array([3, 4]) }], finalLength: 2048, ...(undo ? { undo, undoLength: 4096 } : {}) });

  it('refuses to write a record recovery could not read back', () => {
    const huge: JournalRecord = { ...prep(), plan: { note: 'x'.repeat(MAX_JSON + 1) } } as JournalRecord;
    expect(() => encodeRecord(huge)).toThrow(JournalTooLargeError);
  });

  it('a commit record carries undo bytes beside the redo bytes (relocating conversions)', () => {
    const undo = [{ offset: 512, bytes: new Uint8Array([9, 9, 9]) }];
    const [rec] = decodeJournal(encodeRecord(commit(undo))).records;
    expect(rec).toEqual({ ...commit(undo), features: ['relocating'] });
    const st = journalState(decodeJournal(concat([encodeRecord(prep()), encodeRecord(commit(undo))])));
    expect(st.state).toBe('committed');
    if (st.state !== 'committed') return;
    expect(undoOf(st.prepare, st.commit)).toEqual({ undo, length: 4096 });
    expect(undoOf(st.prepare)).toEqual({ undo: st.prepare.undo, length: 1024 });
  });

  it('a two-step journal is in the state of its last step, and remembers the first', () => {
    const first = prep({ to: 'raw', options: {} });
    const second: JournalRecord = { ...prep(), sourceFormat: 'vmdk', targetFormat: 'raw' } as JournalRecord;
    const one = journalState(decodeJournal(concat([encodeRecord(first), encodeRecord(commit()), encodeRecord({ type: 'done' })])));
    expect(one).toMatchObject({ state: 'done', step: 1 });
    const two = journalState(decodeJournal(concat([encodeRecord(first), encodeRecord(commit()), encodeRecord({ type: 'done' }), encodeRecord(second)])));
    expect(two).toMatchObject({ state: 'prepared', step: 2, prepare: { sourceFormat: 'vmdk' }, first: { then: { to: 'raw' } } });
    const twoDone = journalState(decodeJournal(concat([encodeRecord(first), encodeRecord(commit()), encodeRecord({ type: 'done' }), encodeRecord(second), encodeRecord(commit()), encodeRecord({ type: 'done' })])));
    expect(twoDone).toMatchObject({ state: 'done', step: 2 });
  });
});
