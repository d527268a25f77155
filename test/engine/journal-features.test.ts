/**
 * Journal features: every record whose meaning depends on an optional field names it, and every reader
 * that acts on a journal refuses one that names what it does not understand — leaving the image and the
 * journal byte-identical. A journal written without features (before they existed) recovers as before.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  decodeJournal,
  encodeRecord,
  featuresOf,
  journalPath,
  JournalNotUnderstoodError,
  notUnderstood,
  UNDERSTOOD_FEATURES,
  type JournalRecord,
  type PrepareRecord,
} from '../../src/engine/journal.js';
import { recover } from '../../src/engine/recover.js';
import { allDrivers } from '../../drivers/index.js';
import { withTmpDir } from '../support/qemu.js';

const root = join(import.meta.dirname, '..', '..');
const tmp = withTmpDir('imgconv-jfeat-');
afterAll(() => tmp.cleanup());

function concat(parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map((p) => Buffer.from(p))));
}

/** A record re-encoded with its JSON changed by `edit` (and its checksum recomputed): how another build writes. */
function rewriteJson(record: Uint8Array, edit: (meta: Record<string, unknown>) => void, typeCode?: number): Uint8Array {
  const b = Buffer.from(record);
  const jsonLen = b.readUInt32LE(12);
  const meta = JSON.parse(b.subarray(24, 24 + jsonLen).toString('utf8')) as Record<string, unknown>;
  edit(meta);
  const json = Buffer.from(JSON.stringify(meta), 'utf8');
  const head = Buffer.from(b.subarray(0, 24));
  head.writeUInt32LE(json.length, 12);
  if (typeCode !== undefined) head.writeUInt32LE(typeCode, 8);
  const body = Buffer.concat([head, json, b.subarray(24 + jsonLen, b.length - 32)]);
  return new Uint8Array(Buffer.concat([body, createHash('sha256').update(body).digest()]));
}

const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

const prepare = (extra: Partial<PrepareRecord> = {}, plan: Record<string, unknown> = {}): PrepareRecord => ({
  type: 'prepare',
  sourceFormat: 'raw',
  targetFormat: 'qcow2',
  originalLength: 65536,
  sourceDigest: '0'.repeat(64),
  undo: [],
  plan: { virtualSize: 65536, backing: null, moves: [], ...plan },
  ...extra,
});

describe('journal features: encoding', () => {
  const known = fc.constantFrom(...UNDERSTOOD_FEATURES);
  const name = fc.oneof(known, fc.string({ minLength: 1, maxLength: 12 }));
  const recordArb: fc.Arbitrary<JournalRecord> = fc.oneof(
    fc.record(
      {
        type: fc.constant('prepare' as const),
        sourceFormat: fc.constantFrom('qcow2', 'qed', 'vmdk', 'vhd', 'raw'),
        targetFormat: fc.constantFrom('qcow2', 'qed', 'vmdk', 'vhd', 'raw'),
        originalLength: fc.nat(2 ** 50),
        sourceDigest: fc.constant('ab'.repeat(32)),
        undo: fc.array(fc.record({ offset: fc.nat(2 ** 40), bytes: fc.uint8Array({ maxLength: 64 }) }), { maxLength: 2 }),
        plan: fc.record(
          { identity: fc.boolean(), holesAsData: fc.boolean(), adoption: fc.record({ dataFile: fc.string() }), virtualSize: fc.nat() },
          { requiredKeys: ['virtualSize'] },
        ),
        relocating: fc.boolean(),
        then: fc.record({ to: fc.constantFrom('qcow2', 'vhd'), options: fc.dictionary(fc.string(), fc.string(), { maxKeys: 2 }) }),
        features: fc.array(name, { maxLength: 4 }),
      },
      { requiredKeys: ['type', 'sourceFormat', 'targetFormat', 'originalLength', 'sourceDigest', 'undo', 'plan'] },
    ),
    fc.record(
      {
        type: fc.constant('commit' as const),
        redo: fc.array(fc.record({ offset: fc.nat(2 ** 40), bytes: fc.uint8Array({ maxLength: 64 }) }), { maxLength: 2 }),
        finalLength: fc.integer({ min: -1, max: 2 ** 50 }),
        undo: fc.array(fc.record({ offset: fc.nat(2 ** 40), bytes: fc.uint8Array({ maxLength: 64 }) }), { maxLength: 2 }),
        undoLength: fc.nat(2 ** 50),
        companion: fc.record({ path: fc.string(), data: fc.base64String() }),
        features: fc.array(name, { maxLength: 4 }),
      },
      { requiredKeys: ['type', 'redo', 'finalLength'] },
    ),
    fc.record({ type: fc.constant('done' as const), features: fc.array(name, { maxLength: 2 }) }, { requiredKeys: ['type'] }),
    fc.record({ type: fc.constant('abort' as const), reason: fc.string(), features: fc.array(name, { maxLength: 2 }) }, { requiredKeys: ['type', 'reason'] }),
  );

  test.prop([fc.array(recordArb, { maxLength: 4 })])('the feature list round-trips: decoded = fields plus derived features, and re-encoding is byte-identical', (recs) => {
    const bytes = concat(recs.map(encodeRecord));
    const d = decodeJournal(bytes);
    expect(d.tornTail).toBe(false);
    expect(d.records).toHaveLength(recs.length);
    d.records.forEach((got, i) => {
      const want = featuresOf(recs[i]!);
      expect(got.features ?? []).toEqual(want);
      // sorted, no duplicates, and every name the caller gave is kept
      expect(want).toEqual([...new Set(want)].sort());
      for (const f of recs[i]!.features ?? []) expect(want).toContain(f);
      const { features: _a, ...restGot } = got;
      const { features: _b, ...restWant } = recs[i]!;
      expect(restGot).toEqual(restWant);
    });
    expect(Buffer.from(concat(d.records.map(encodeRecord))).equals(Buffer.from(bytes))).toBe(true);
    // Understood exactly when every name is one of this build's.
    const unknown = new Set(recs.flatMap((r) => featuresOf(r)).filter((f) => !(UNDERSTOOD_FEATURES as readonly string[]).includes(f)));
    expect(notUnderstood(d)).toEqual([...unknown].map((f) => `feature "${f}"`));
  });

  it('each kind of record gets the features its fields need', () => {
    const cases: [string, JournalRecord, string[]][] = [
      ['plain prepare', prepare(), []],
      ['relocating prepare', prepare({ relocating: true }), ['relocating']],
      ['relocating: false is no feature', prepare({ relocating: false }), []],
      ['first of two steps', prepare({ then: { to: 'vhd', options: {} } }), ['two-step']],
      ['second of two steps (its own record is plain)', prepare({ sourceFormat: 'vmdk' }), []],
      ['adoption with a second step', prepare({ targetFormat: 'raw', then: { to: 'qcow2', options: {} } }, { adoption: { dataFile: '/d/disk.raw' } }), ['adopt-data-file', 'two-step']],
      ['identity target (raw, VHD fixed)', prepare({ targetFormat: 'raw', relocating: true }, { identity: true }), ['identity', 'relocating']],
      ['VHD dynamic keeps holes unallocated', prepare({ targetFormat: 'vhd' }, { holesAsData: false }), ['holes-unallocated']],
      ['informational plan fields are no features', prepare({}, { metadataBytes: 4096, dataMoveBytes: 0, finalLength: 65536, identity: false, holesAsData: true }), []],
      ['plain commit', { type: 'commit', redo: [], finalLength: -1 }, []],
      ['relocating commit (undo bytes in it)', { type: 'commit', redo: [], finalLength: 1, undo: [], undoLength: 2 }, ['relocating']],
      ['commit with a companion file', { type: 'commit', redo: [], finalLength: 1, companion: { path: '/d/x.vmdk', data: '' } }, ['companion']],
      ['done', { type: 'done' }, []],
      ['abort', { type: 'abort', reason: 'x' }, []],
    ];
    for (const [what, rec, want] of cases) {
      const [got] = decodeJournal(encodeRecord(rec)).records;
      expect(got!.features ?? [], what).toEqual(want);
      for (const f of want) expect(UNDERSTOOD_FEATURES as readonly string[], what).toContain(f);
    }
  });

  it('a record without features (as written before they existed) decodes and is understood', () => {
    const old = rewriteJson(encodeRecord(prepare({ relocating: true })), (m) => delete m.features);
    const d = decodeJournal(old);
    expect(d.records[0]).toMatchObject({ type: 'prepare', relocating: true });
    expect(d.records[0]!.features).toBeUndefined();
    expect(notUnderstood(d)).toEqual([]);
  });

  it('names what it does not understand: unknown features, a malformed list, an unknown record type', () => {
    const p = encodeRecord(prepare({ features: ['relocating', 'zz-future'] }));
    expect(notUnderstood(decodeJournal(p))).toEqual(['feature "zz-future"']);
    const malformed = rewriteJson(encodeRecord(prepare()), (m) => (m.features = 'relocating'));
    expect(notUnderstood(decodeJournal(malformed))).toEqual(['a prepare record\'s features field "relocating" (not a list of names)']);
    // A checksummed record of a type this build lacks is not a torn tail: recovery must not cut it off.
    const future = rewriteJson(encodeRecord({ type: 'done' }), (m) => (m.type = 'checkpoint'), 9);
    const d = decodeJournal(concat([encodeRecord(prepare()), future, encodeRecord({ type: 'done' })]));
    expect(d).toMatchObject({ unknownType: 9, tornTail: false });
    expect(d.records).toHaveLength(1);
    expect(notUnderstood(d)).toEqual(['record type 9']);
    // …while a corrupted type code (checksum fails) is a torn tail as before.
    const torn = Buffer.from(encodeRecord({ type: 'done' }));
    torn.writeUInt32LE(9, 8);
    expect(decodeJournal(concat([encodeRecord(prepare()), torn]))).toMatchObject({ tornTail: true, validLength: encodeRecord(prepare()).length });
    expect(notUnderstood(decodeJournal(concat([encodeRecord(prepare()), torn])))).toEqual([]);
  });
});

/**
 * An image as an interrupted raw → qcow2 conversion leaves it before the commit point: the file grew
 * past its original 64 KiB (metadata written past the end) and the journal holds the first sector's old
 * bytes. Recovery without features rolls back: undo bytes, truncate to 64 KiB.
 */
function interrupted(name: string, records: (head: Uint8Array) => Uint8Array[]): { image: string; journal: string } {
  const image = tmp.path(name);
  const bytes = new Uint8Array(3 * 65536);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >> 9)) & 0xff;
  writeFileSync(image, bytes);
  writeFileSync(journalPath(image), concat(records(bytes.slice(0, 512))));
  return { image, journal: journalPath(image) };
}

const plainPrepare = (head: Uint8Array, extra: Partial<PrepareRecord> = {}) => encodeRecord(prepare({ undo: [{ offset: 0, bytes: head }], ...extra }));

describe('journal features: recovery refuses what it does not understand', () => {
  const refusals: [string, (head: Uint8Array) => Uint8Array[], string][] = [
    ['an unknown feature in the PREPARE', (h) => [plainPrepare(h, { features: ['adopt-snapshot'] })], 'feature "adopt-snapshot"'],
    ['an unknown feature beside known ones', (h) => [plainPrepare(h, { relocating: true, features: ['zz-future'] })], 'feature "zz-future"'],
    ['an unknown feature in a later record', (h) => [plainPrepare(h), encodeRecord({ type: 'commit', redo: [{ offset: 0, bytes: h }], finalLength: -1, features: ['zz-commit'] })], 'feature "zz-commit"'],
    ['a malformed features field', (h) => [rewriteJson(plainPrepare(h), (m) => (m.features = [1]))], 'not a list of names'],
    ['an unknown record type', (h) => [plainPrepare(h), rewriteJson(encodeRecord({ type: 'done' }), (m) => (m.type = 'future'), 7)], 'record type 7'],
    ['an unknown first record (no PREPARE this build can read)', () => [rewriteJson(encodeRecord({ type: 'done' }), (m) => (m.type = 'future'), 7)], 'record type 7'],
  ];
  for (const [what, records, named] of refusals) {
    it(`${what}: refused, image and journal byte-identical`, async () => {
      const { image, journal } = interrupted(`refuse-${refusals.findIndex((r) => r[0] === what)}.raw`, records);
      const before = [sha(image), sha(journal), statSync(image).size];
      const e = await recover(image, { drivers: allDrivers }).then(
        () => null,
        (x: unknown) => x,
      );
      expect(e).toBeInstanceOf(JournalNotUnderstoodError);
      const msg = (e as Error).message;
      expect(msg).toContain(named);
      expect(msg).toContain(journal);
      expect(msg).toMatch(/a newer imgconv wrote this journal/);
      expect(msg).toMatch(/Nothing was changed/);
      expect([sha(image), sha(journal), statSync(image).size]).toEqual(before);
    });
  }

  it('a journal without features still recovers (rolled back: undo bytes, original length, journal removed)', async () => {
    const { image, journal } = interrupted('old-plain.raw', (h) => [rewriteJson(plainPrepare(h), (m) => delete m.features)]);
    const head = readFileSync(image).subarray(0, 65536);
    const r = await recover(image, { drivers: allDrivers });
    expect(r).toMatchObject({ action: 'rolled-back', format: 'raw' });
    expect(statSync(image).size).toBe(65536);
    expect(Buffer.from(readFileSync(image)).equals(Buffer.from(head))).toBe(true);
    expect(existsSync(journal)).toBe(false);
  });

  it('a relocating PREPARE without features (older build) still recovers as relocating: not truncated', async () => {
    const { image, journal } = interrupted('old-relocating.raw', (h) => [rewriteJson(plainPrepare(h, { relocating: true }), (m) => delete m.features)]);
    const before = sha(image);
    const r = await recover(image, { drivers: allDrivers });
    expect(r).toMatchObject({ action: 'rolled-back', format: 'raw' });
    expect(statSync(image).size).toBe(3 * 65536);
    expect(sha(image)).toBe(before);
    expect(existsSync(journal)).toBe(false);
  });

  it('a journal whose features this build knows recovers (relocating: not truncated)', async () => {
    const { image, journal } = interrupted('known.raw', (h) => [plainPrepare(h, { relocating: true })]);
    expect(decodeJournal(readFileSync(journal)).records[0]!.features).toEqual(['relocating']);
    const r = await recover(image, { drivers: allDrivers });
    expect(r).toMatchObject({ action: 'rolled-back', format: 'raw' });
    expect(statSync(image).size).toBe(3 * 65536);
    expect(existsSync(journal)).toBe(false);
  });
});

describe('journal features: the CLI', () => {
  const bin = join(root, 'bin', 'imgconv');
  beforeAll(() => {
    // bin/imgconv runs the build: make sure it has this check (build only when it does not).
    const built = join(root, 'dist', 'src', 'engine', 'journal.js');
    if (!existsSync(built) || !readFileSync(built, 'utf8').includes('UNDERSTOOD_FEATURES')) {
      const b = spawnSync('npx', ['tsc', '-p', root], { encoding: 'utf8' });
      if (b.status !== 0) throw new Error(`build failed: ${b.stdout}${b.stderr}`);
    }
  }, 120_000);

  it('imgconv recover refuses a journal with an unknown feature: exit 1, the feature and journal named, nothing written', () => {
    const { image, journal } = interrupted('cli.raw', (h) => [plainPrepare(h, { features: ['adopt-snapshot'] })]);
    const before = [sha(image), sha(journal), statSync(image).size];
    const r = spawnSync(process.execPath, [bin, 'recover', image], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^imgconv: /);
    expect(r.stderr).toContain('feature "adopt-snapshot"');
    expect(r.stderr).toContain(journal);
    expect(r.stderr).toMatch(/newer imgconv/);
    expect(r.stderr).not.toMatch(/at .*\.js:\d+/);
    expect([sha(image), sha(journal), statSync(image).size]).toEqual(before);
    // inplace and plan refuse while the journal is there, and point at recover; still nothing written.
    for (const args of [['inplace', '--progress', 'none', '--to', 'qcow2', image], ['plan', '--to', 'qcow2', image]]) {
      const x = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
      expect(x.status, args[0]).not.toBe(0);
      expect(x.stderr, args[0]).toContain('imgconv recover');
    }
    expect([sha(image), sha(journal), statSync(image).size]).toEqual(before);
  });
});
