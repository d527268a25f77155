/**
 * Hostile and damaged VHDs: every header field and table-entry class with a bad value gives a
 * FormatError naming the field (or UnsupportedError for valid-but-unhandled), block placement
 * problems are refused by mapping() and listed by check(), and random mutations never produce
 * anything but an ImgconvError, never a write, never a hang.
 */
import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import { FormatError, ImgconvError, UnsupportedError } from '../../src/errors.js';
import { checkImage } from '../../src/check.js';
import { DYN_CHECKSUM_OFFSET, FOOTER_CHECKSUM_OFFSET, vhdChecksum } from '../../drivers/vhd/index.js';
import { buildDynamic, buildFixed, footer, openMem, DISK_DYNAMIC } from './vhd-support.js';

const MiB = 1024 * 1024;

/** A small valid dynamic VHD: 8 MiB, 64 KiB blocks, three allocated. */
function base() {
  return buildDynamic({
    virtualSize: 8 * MiB,
    blockSize: 64 * 1024,
    blocks: new Map([
      [0, { data: 0x11 }],
      [5, { data: 0x22 }],
      [127, { data: 0x33 }],
    ]),
  });
}

function be(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Rewrites the footer copy at 0 and at the end, with a fixed-up checksum. */
function patchFooter(bytes: Uint8Array, patch: (dv: DataView) => void, fixChecksum = true): Uint8Array {
  const out = bytes.slice();
  for (const at of [0, out.length - 512]) {
    const f = out.subarray(at, at + 512);
    patch(be(f));
    if (fixChecksum) be(f).setUint32(FOOTER_CHECKSUM_OFFSET, vhdChecksum(f, FOOTER_CHECKSUM_OFFSET));
  }
  return out;
}

function patchHeader(bytes: Uint8Array, patch: (dv: DataView) => void): Uint8Array {
  const out = bytes.slice();
  const h = out.subarray(512, 1536);
  patch(be(h));
  be(h).setUint32(DYN_CHECKSUM_OFFSET, vhdChecksum(h, DYN_CHECKSUM_OFFSET));
  return out;
}

function patchBat(b: ReturnType<typeof base>, index: number, value: number): Uint8Array {
  const out = b.bytes.slice();
  be(out).setUint32(b.tableOffset + index * 4, value);
  return out;
}

async function openError(bytes: Uint8Array): Promise<unknown> {
  return openMem(bytes).then(
    () => undefined,
    (e: unknown) => e,
  );
}

async function expectField(bytes: Uint8Array, field: string | RegExp, cls: typeof ImgconvError = FormatError): Promise<void> {
  const e = await openError(bytes);
  expect(e).toBeInstanceOf(cls);
  if (cls === FormatError) {
    if (typeof field === 'string') expect((e as FormatError).field).toBe(field);
    else expect((e as FormatError).field).toMatch(field);
  }
}

describe('the base image is valid', () => {
  it('opens, maps and checks clean', async () => {
    const img = await openMem(base().bytes);
    const map = await img.mapping();
    expect(map.totals()).toEqual({ data: 3 * 64 * 1024, zero: 8 * MiB - 3 * 64 * 1024, unallocated: 0, compressed: 0 });
    const r = await checkImage(img);
    expect(r).toMatchObject({ corruptions: 0, leaks: 0, messages: [], allocatedClusters: 3, totalClusters: 128 });
  });
});

describe('footer fields', () => {
  const b = base().bytes;
  it('bad checksum → FormatError (QEMU: "Incorrect header checksum")', async () => {
    const bad = patchFooter(b, (dv) => dv.setUint32(FOOTER_CHECKSUM_OFFSET, 0x12345678), false);
    await expectField(bad, 'footer checksum');
    const e = (await openError(bad)) as FormatError;
    expect(e.message).toMatch(/Incorrect header checksum/);
  });
  it('disk type 0, 7 → FormatError; 1, 5, 6 (deprecated) → UnsupportedError', async () => {
    for (const t of [0, 7, 0xffffffff]) await expectField(patchFooter(b, (dv) => dv.setUint32(60, t)), 'footer disk type');
    for (const t of [1, 5, 6]) await expectField(patchFooter(b, (dv) => dv.setUint32(60, t)), '', UnsupportedError);
  });
  it('a fixed-type footer at offset 0, a dynamic footer only at the end', async () => {
    await expectField(patchFooter(b, (dv) => dv.setUint32(60, 2)), 'footer disk type');
    const tailOnly = b.slice();
    tailOnly.fill(0, 0, 512);
    await expectField(tailOnly, 'footer disk type');
  });
  it('virtual size above 2040 GiB (current_size with a trusted creator; max geometry)', async () => {
    const huge = patchFooter(b, (dv) => dv.setBigUint64(48, 2041n << 30n));
    await expectField(huge, 'current_size');
    const hugeU64 = patchFooter(b, (dv) => dv.setBigUint64(48, 0xffffffffffffffffn));
    await expectField(hugeU64, 'current_size');
  });
  it('data_offset beyond 2^53, past the end, or not at a "cxsparse" header', async () => {
    await expectField(patchFooter(b, (dv) => dv.setBigUint64(16, 1n << 60n)), 'footer data_offset');
    await expectField(patchFooter(b, (dv) => dv.setBigUint64(16, BigInt(b.length))), 'footer data_offset (dynamic header)');
    await expectField(patchFooter(b, (dv) => dv.setBigUint64(16, 1024n)), 'dynamic header cookie');
  });
  it('no cookie anywhere; a file shorter than a footer', async () => {
    await expectField(new Uint8Array(4096), 'footer cookie');
    await expectField(new Uint8Array(100), 'file size');
  });
  it('a 511-byte footer (Virtual PC before 2004) is refused by name', async () => {
    const old = new Uint8Array(4096 + 511);
    old.set(footer({ diskType: 2, currentSize: 4096 }).subarray(0, 511), 4096);
    const e = await openError(old);
    expect(e).toBeInstanceOf(UnsupportedError);
    expect((e as Error).message).toMatch(/511-byte footer/);
  });
  it('fixed: a virtual size larger than the data before the footer', async () => {
    const f = buildFixed(4096, { currentSize: 8192, creatorApp: 'win ' });
    await expectField(f, 'virtual size');
    // the same footer over enough data is fine
    const ok = await openMem(buildFixed(8192, { currentSize: 8192, creatorApp: 'win ' }));
    expect(ok.info.virtualSize).toBe(8192);
  });
});

describe('dynamic header fields', () => {
  const b = base().bytes;
  it('block_size 0 or not a power of two → FormatError (CVE-2014-0142 family)', async () => {
    for (const bs of [0, 1, 511, 3000, 4097, 0x80000001, 0xffffffff]) await expectField(patchHeader(b, (dv) => dv.setUint32(32, bs)), 'block_size');
  });
  it('block sizes below 4 KiB are refused: QEMU and the spec disagree on their bitmap', async () => {
    for (const bs of [512, 1024, 2048]) {
      const bytes = buildDynamic({ virtualSize: 64 * 1024, blockSize: bs }).bytes;
      await expectField(bytes, '', UnsupportedError);
    }
  });
  it('max_table_entries too small, huge, or above INT_MAX / 4', async () => {
    await expectField(patchHeader(b, (dv) => dv.setUint32(28, 127)), 'max_table_entries');
    await expectField(patchHeader(b, (dv) => dv.setUint32(28, 0xffffffff)), 'max_table_entries');
    await expectField(patchHeader(b, (dv) => dv.setUint32(28, 0x10000000)), 'BAT (table_offset)');
  });
  it('BAT past the end of the file, or at an offset beyond 2^53', async () => {
    await expectField(patchHeader(b, (dv) => dv.setBigUint64(16, BigInt(b.length - 100))), 'BAT (table_offset)');
    await expectField(patchHeader(b, (dv) => dv.setBigUint64(16, 1n << 62n)), 'table_offset');
  });
  it('a bad header checksum opens (QEMU ignores it) and is a check() corruption', async () => {
    const bad = b.slice();
    be(bad).setUint32(512 + DYN_CHECKSUM_OFFSET, 1);
    const img = await openMem(bad);
    expect(img.info.details['header-checksum-ok']).toBe(false);
    const r = await checkImage(img);
    expect(r.corruptions).toBe(1);
    expect(r.messages[0]).toMatch(/dynamic header checksum/);
    await img.mapping();
  });
});

describe('BAT entries and block placement', () => {
  const b = base();
  const span = (b.bitmapSize + b.blockSize) / 512;

  async function refusedByMapping(bytes: Uint8Array, messageRe: RegExp): Promise<void> {
    const img = await openMem(bytes);
    const e = await img.mapping().catch((x: unknown) => x);
    expect(e).toBeInstanceOf(FormatError);
    expect((e as FormatError).field).toMatch(/^BAT entry \d+$|^footer$|^BAT$/);
    const r = await checkImage(img);
    expect(r.corruptions).toBeGreaterThan(0);
    expect(r.messages.join('\n')).toMatch(messageRe);
  }

  it('a block past the end of the file', async () => {
    await refusedByMapping(patchBat(b, 3, b.bytes.length / 512), /past the end of the file/);
    await refusedByMapping(patchBat(b, 200 % 128, 0xfffffffe), /past the end of the file/);
  });
  it('a block overlapping the BAT, the header, the footer copy', async () => {
    await refusedByMapping(patchBat(b, 3, b.tableOffset / 512), /overlaps the BAT/);
    await refusedByMapping(patchBat(b, 3, 1), /overlaps the dynamic header/);
    await refusedByMapping(patchBat(b, 3, 0), /overlaps the footer copy/);
  });
  it('two entries sharing a block, and partly overlapping blocks', async () => {
    await refusedByMapping(patchBat(b, 9, b.bat[5]!), /overlaps block/);
    await refusedByMapping(patchBat(b, 9, b.bat[5]! + 1), /overlaps block/);
  });
  it('a block overlapping the footer at the end of the file', async () => {
    await refusedByMapping(patchBat(b, 9, b.firstBlockSector + 3 * span - span + 1), /overlaps/);
  });
  it('a million entries all pointing at the BAT: counted, a bounded number of messages, quickly', async () => {
    const n = 1 << 20;
    const big = buildDynamic({ virtualSize: n * 4096, blockSize: 4096, maxTableEntries: n });
    const bytes = big.bytes;
    const dv = be(bytes);
    for (let i = 0; i < n; i++) dv.setUint32(big.tableOffset + i * 4, big.tableOffset / 512);
    const t0 = Date.now();
    const img = await openMem(bytes);
    await expect(img.mapping()).rejects.toBeInstanceOf(FormatError);
    const r = await checkImage(img);
    expect(r.corruptions).toBeGreaterThanOrEqual(n);
    expect(r.messages.length).toBeLessThan(400);
    expect(Date.now() - t0).toBeLessThan(20_000);
  });
});

describe('findings check() reports on an image that still reads', () => {
  const b = base();
  it('footer at the end missing, damaged, or different from the copy', async () => {
    const missing = buildDynamic({ virtualSize: 8 * MiB, blockSize: 64 * 1024, blocks: new Map([[0, { data: 1 }]]), noEofFooter: true }).bytes;
    let r = await checkImage(await openMem(missing));
    expect(r.corruptions).toBe(1);
    expect(r.messages[0]).toMatch(/no footer at the end/);

    const damaged = b.bytes.slice();
    damaged[damaged.length - 512 + 100] = 7;
    r = await checkImage(await openMem(damaged));
    expect(r.messages[0]).toMatch(/bad checksum/);

    const differs = b.bytes.slice();
    const tail = differs.subarray(differs.length - 512);
    be(tail).setUint32(24, 42);
    be(tail).setUint32(FOOTER_CHECKSUM_OFFSET, vhdChecksum(tail, FOOTER_CHECKSUM_OFFSET));
    const img = await openMem(differs);
    r = await checkImage(img);
    expect(r.corruptions).toBe(1);
    expect(r.messages[0]).toMatch(/differs from the copy at offset 0 in: timestamp, checksum/);
    expect(img.info.details['eof-footer']).toMatch(/differs/);
  });
  it('leaked space between blocks', async () => {
    // Move block 127 one block further: the space it left is referenced by nothing.
    const moved = patchBat(b, 127, b.bat[127]! + (b.bitmapSize + b.blockSize) / 512);
    const grown = new Uint8Array(moved.length + b.bitmapSize + b.blockSize);
    grown.set(moved.subarray(0, moved.length - 512));
    grown.set(moved.subarray(moved.length - 512), grown.length - 512);
    const img = await openMem(grown);
    const r = await checkImage(img);
    expect(r.corruptions).toBe(0);
    expect(r.leaks).toBe(1);
    expect(r.messages[0]).toMatch(/^Leaked: \d+ bytes at offset \d+ are not referenced/);
  });
  it('an allocated BAT entry beyond the virtual size is a warning; saved state and temporary are features', async () => {
    const extra = buildDynamic({ virtualSize: 4 * 64 * 1024, blockSize: 64 * 1024, maxTableEntries: 6, blocks: new Map([[5, { data: 9 }]]) });
    let img = await openMem(extra.bytes);
    let r = await checkImage(img);
    expect(r.corruptions).toBe(0);
    expect(r.messages[0]).toMatch(/^Warning: BAT entry 5 is allocated/);
    expect((await img.hostSpace()).free()).toEqual([]);

    const saved = patchFooter(extra.bytes, (dv) => {
      dv.setUint8(84, 1);
      dv.setUint32(8, 3);
    });
    img = await openMem(saved);
    expect(img.info.features).toEqual(['temporary disk', 'saved state']);
    expect(img.info.dirty).toBe(false);
    r = await checkImage(img);
    expect(r.corruptions).toBe(0);
  });
});

describe('mutation fuzz', () => {
  const b = base();
  const limit = b.tableOffset + 128 * 4 + 8;
  test.prop(
    [fc.array(fc.record({ at: fc.integer({ min: 0, max: limit - 1 }), value: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 12 }), fc.boolean()],
    { numRuns: 300 },
  )('random overwrites of the footer copy, header and BAT: only ImgconvErrors, no writes, no hang', async (edits, fixChecksums) => {
    const bytes = b.bytes.slice();
    for (const e of edits) bytes[e.at] = e.value;
    if (fixChecksums) {
      const f = bytes.subarray(0, 512);
      be(f).setUint32(FOOTER_CHECKSUM_OFFSET, vhdChecksum(f, FOOTER_CHECKSUM_OFFSET));
      const h = bytes.subarray(512, 1536);
      be(h).setUint32(DYN_CHECKSUM_OFFSET, vhdChecksum(h, DYN_CHECKSUM_OFFSET));
    }
    try {
      const img = await openMem(bytes);
      await checkImage(img);
      try {
        await img.mapping();
        (await img.hostSpace()).finish();
      } catch (e) {
        if (!(e instanceof ImgconvError)) throw e;
      }
    } catch (e) {
      if (!(e instanceof ImgconvError)) throw e;
    }
  });

  test.prop([fc.integer({ min: 0, max: 511 }), fc.integer({ min: 0, max: 255 })], { numRuns: 200 })('fixed footer mutations: only ImgconvErrors', async (at, value) => {
    const bytes = buildFixed(64 * 1024, { currentSize: 64 * 1024, creatorApp: 'win ' });
    bytes[64 * 1024 + at] = value;
    const f = bytes.subarray(64 * 1024);
    be(f).setUint32(FOOTER_CHECKSUM_OFFSET, vhdChecksum(f, FOOTER_CHECKSUM_OFFSET));
    try {
      const img = await openMem(bytes);
      await img.mapping();
      await checkImage(img);
    } catch (e) {
      if (!(e instanceof ImgconvError)) throw e;
    }
  });
});

export { DISK_DYNAMIC };
