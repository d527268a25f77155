/**
 * The batch manifest: encode/decode round trip (property), a torn last line ignored and cut off
 * before the next append, a damaged line before it refused, state = last record, one write and
 * one fsync per append, and the real file system implementation.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import {
  decodeManifestRecord,
  encodeManifestRecord,
  fileManifestIo,
  latestStates,
  Manifest,
  MANIFEST_STATES,
  MANIFEST_VERSION,
  parseManifest,
  type ManifestAppender,
  type ManifestIo,
  type ManifestRecord,
} from '../../src/batch/manifest.js';
import { UsageError } from '../../src/errors.js';
import { withTmpDir } from '../support/qemu.js';

const text = fc.string({ unit: 'grapheme', minLength: 1, maxLength: 24 });
const count = fc.nat({ max: Number.MAX_SAFE_INTEGER });
const recordArb: fc.Arbitrary<ManifestRecord> = fc.record(
  {
    v: fc.constant(MANIFEST_VERSION),
    image: text,
    given: text,
    state: fc.constantFrom(...MANIFEST_STATES),
    to: fc.constantFrom('qcow2', 'qed', 'vmdk', 'vhd', 'raw'),
    at: fc.date({ noInvalidDate: true }).map((d) => d.toISOString()),
    from: fc.constantFrom('qcow2', 'qed', 'vmdk', 'vhd', 'raw'),
    // Reasons carry anything a message can: newlines, quotes, control characters, emoji.
    reason: fc.string({ unit: 'binary', maxLength: 40 }),
    note: fc.string({ maxLength: 20 }),
    elapsedMs: count,
    metadataBytes: count,
    dataBytes: count,
    compactionBytes: count,
  },
  { requiredKeys: ['v', 'image', 'given', 'state', 'to', 'at'] },
);

/** In-memory ManifestIo that counts what the contract says: one write then one fsync per append. */
class FakeIo implements ManifestIo {
  files = new Map<string, string>();
  ops: string[] = [];
  async read(path: string) {
    return this.files.get(path);
  }
  async openAppend(path: string, keepBytes?: number): Promise<ManifestAppender> {
    if (!this.files.has(path)) {
      this.files.set(path, '');
      this.ops.push('create+syncdir');
    }
    if (keepBytes !== undefined) {
      this.files.set(path, Buffer.from(this.files.get(path)!, 'utf8').subarray(0, keepBytes).toString('utf8'));
      this.ops.push(`truncate ${keepBytes}+fsync`);
    }
    return {
      append: async (t: string) => {
        this.files.set(path, this.files.get(path)! + t);
        this.ops.push(`write+fsync ${t.split('\n').length - 1}`);
      },
      close: async () => {
        this.ops.push('close');
      },
    };
  }
}

function rec(image: string, state: ManifestRecord['state'], extra: Partial<ManifestRecord> = {}): ManifestRecord {
  return { v: MANIFEST_VERSION, image, given: image, state, to: 'qed', at: '2026-11-22T00:00:00.000Z', ...extra };
}

describe('manifest records', () => {
  test.prop([recordArb])('encode → decode round trip, always one line', (r) => {
    const line = encodeManifestRecord(r);
    expect(line.endsWith('\n')).toBe(true);
    expect(line.slice(0, -1)).not.toContain('\n');
    expect(decodeManifestRecord(line.slice(0, -1))).toEqual(r);
  });

  test.prop([fc.array(recordArb, { maxLength: 6 })])('a file of records parses back to the same records', (recs) => {
    const p = parseManifest(recs.map(encodeManifestRecord).join(''));
    expect(p.records).toEqual(recs);
    expect(p.tornBytes).toBe(0);
  });

  test.prop([fc.array(recordArb, { minLength: 1, maxLength: 5 }), fc.nat()])('a torn last line is ignored: exactly the complete records remain', (recs, seed) => {
    const whole = recs.map(encodeManifestRecord).join('');
    const last = Buffer.byteLength(encodeManifestRecord(recs[recs.length - 1]!));
    // Cut anywhere inside the last line, before its newline (a torn append).
    const cut = Buffer.byteLength(whole) - 1 - (seed % last);
    const torn = Buffer.from(whole).subarray(0, cut).toString('utf8');
    const p = parseManifest(torn);
    expect(p.records).toEqual(recs.slice(0, -1));
    expect(p.validBytes + p.tornBytes).toBe(Buffer.byteLength(torn));
  });

  it('a damaged line before the last is refused, naming the line', () => {
    const good = encodeManifestRecord(rec('/a', 'pending'));
    expect(() => parseManifest(good + '{"v":1,"image":"/b"\n' + good, 'm.jsonl')).toThrow(UsageError);
    expect(() => parseManifest(good + '{"v":1,"image":"/b"\n' + good, 'm.jsonl')).toThrow(/m\.jsonl line 2: not JSON/);
    const badState = JSON.stringify({ ...rec('/a', 'pending'), state: 'halfway' });
    expect(() => parseManifest(badState + '\n')).toThrow(/field state = "halfway"/);
    expect(() => parseManifest(JSON.stringify({ ...rec('/a', 'done'), v: 2 }) + '\n')).toThrow(/field v = 2/);
    expect(() => parseManifest(JSON.stringify({ ...rec('/a', 'done'), dataBytes: -1 }) + '\n')).toThrow(/field dataBytes = -1/);
  });

  it("an image's state is its last record; images keep the order they first appeared in", () => {
    const states = latestStates([rec('/a', 'pending'), rec('/b', 'pending'), rec('/a', 'converting'), rec('/b', 'refused'), rec('/a', 'done')]);
    expect([...states.keys()]).toEqual(['/a', '/b']);
    expect(states.get('/a')!.state).toBe('done');
    expect(states.get('/b')!.state).toBe('refused');
  });
});

describe('Manifest (writer)', () => {
  it('creates the file (directory synced), appends one write + fsync per call, in call order', async () => {
    const io = new FakeIo();
    const m = await Manifest.open('/m.jsonl', io);
    expect(m.previous).toEqual([]);
    const writes = [m.write(rec('/a', 'pending'), rec('/b', 'pending')), m.write(rec('/a', 'converting')), m.write(rec('/a', 'done'))];
    await Promise.all(writes);
    await m.close();
    expect(io.ops).toEqual(['create+syncdir', 'write+fsync 2', 'write+fsync 1', 'write+fsync 1', 'close']);
    const back = parseManifest(io.files.get('/m.jsonl')!).records;
    expect(back.map((r) => `${r.image} ${r.state}`)).toEqual(['/a pending', '/b pending', '/a converting', '/a done']);
  });

  it('reopening after a torn append: the torn bytes are cut off first, so the next record is a line of its own', async () => {
    const io = new FakeIo();
    const whole = encodeManifestRecord(rec('/a', 'pending')) + encodeManifestRecord(rec('/a', 'converting'));
    const tornLine = encodeManifestRecord(rec('/a', 'done')).slice(0, 30);
    io.files.set('/m.jsonl', whole + tornLine);
    const m = await Manifest.open('/m.jsonl', io);
    expect(m.tornBytes).toBe(30);
    expect(m.latest().get('/a')!.state).toBe('converting');
    await m.write(rec('/a', 'done', { note: 'resumed' }));
    await m.close();
    expect(io.ops[0]).toBe(`truncate ${Buffer.byteLength(whole)}+fsync`);
    const p = parseManifest(io.files.get('/m.jsonl')!);
    expect(p.tornBytes).toBe(0);
    expect(p.records.map((r) => r.state)).toEqual(['pending', 'converting', 'done']);
  });

  it('the real file system: create, append, reopen over a torn tail, read back', async () => {
    const tmp = withTmpDir('imgconv-manifest-');
    try {
      const path = tmp.path('m.jsonl');
      const m = await Manifest.open(path, fileManifestIo);
      await m.write(rec('/x', 'pending'));
      await m.write(rec('/x', 'done', { dataBytes: 4096 }));
      await m.close();
      expect(readFileSync(path, 'utf8').split('\n')).toHaveLength(3);
      writeFileSync(path, readFileSync(path, 'utf8') + '{"v":1,"image":"/y","gi');
      const again = await Manifest.open(path, fileManifestIo);
      expect(again.tornBytes).toBe(23);
      expect(again.latest().get('/x')!.dataBytes).toBe(4096);
      await again.write(rec('/y', 'pending'));
      await again.close();
      const p = parseManifest(readFileSync(path, 'utf8'));
      expect(p.tornBytes).toBe(0);
      expect(p.records.map((r) => `${r.image} ${r.state}`)).toEqual(['/x pending', '/x done', '/y pending']);
      expect(await fileManifestIo.read(tmp.path('none.jsonl'))).toBeUndefined();
    } finally {
      tmp.cleanup();
    }
  });
});
