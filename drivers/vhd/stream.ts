/**
 * VHD as a stream. Dynamic (the default), in the order QEMU's vpc_create lays a new disk out: the
 * footer copy at 0, the dynamic header at 512, the BAT at 1536 (rounded up to a sector, unused
 * entries 0xFFFFFFFF), then each block that holds data — its sector bitmap (all sectors present)
 * and the block — in guest order, and the footer at the end. Fixed (-o subformat=fixed): the guest
 * bytes, then the footer.
 *
 * The size is stored so that every QEMU reads it back exactly: the CHS geometry when it describes the
 * size exactly (QEMU ≤ 9 sizes disks of unknown creators by CHS), otherwise the maximum geometry, for
 * which every QEMU takes current_size (as `qemu-img create -o force_size=on` does). The creator is
 * "imgc", so QEMU ≥ 10 (CHS only for "vpc " and "qemu") takes current_size as well.
 *
 * Read back (unstream): a dynamic VHD whose BAT precedes every block, blocks in any order after it;
 * or a fixed VHD (data, then the footer — recognised only at the end of the stream).
 */
import { randomBytes } from 'node:crypto';
import { safeU64 } from '../../src/binary.js';
import { FormatError, UnsupportedError, UsageError } from '../../src/errors.js';
import { unitRanges } from '../../src/stream/collapse.js';
import { checkStreamOptions, copyGuest } from '../../src/stream/copy.js';
import type { SequentialInput, StreamHead, StreamInput, StreamLayout, StreamTarget } from '../../src/stream/types.js';
import {
  BAT_UNUSED,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_COOKIE,
  DYN_HEADER_SIZE,
  FEATURE_RESERVED,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  FORMAT,
  VHD_EPOCH,
  VHD_VERSION,
  decodeDynHeader,
  decodeFooter,
  encodeDynHeader,
  encodeFooter,
  footerChecksumOk,
  hasCookie,
  printable,
  qemuBitmapSize,
} from './format.js';
import { CHS_MAX_C, CHS_MAX_H, CHS_MAX_S, VHD_MAX_SECTORS, VHD_SECTOR, geometryForSize, geometrySectors, virtualSectors, type Geometry } from './geometry.js';
import { MAX_BAT_BYTES, subformatOf } from './open.js';

/** QEMU's only block size for new dynamic disks (and Hyper-V's default). */
export const STREAM_BLOCK_SIZE = 2 << 20;
const CREATOR_APP = 'imgc';
const CREATOR_VERSION = 0x00010000;
const CREATOR_OS = 'Wi2k';
const BAT_OFFSET = FOOTER_SIZE + DYN_HEADER_SIZE;

/** The geometry to store for `virtualSize` (see the file comment). */
export function streamGeometry(virtualSize: number): Geometry {
  const g = geometryForSize(virtualSize);
  return geometrySectors(g) * VHD_SECTOR === virtualSize ? g : { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };
}

function footerFor(virtualSize: number, diskType: number, uuid: Uint8Array): Uint8Array {
  return encodeFooter({
    features: FEATURE_RESERVED,
    version: VHD_VERSION,
    dataOffset: diskType === DISK_FIXED ? 0xffffffffffffffffn : BigInt(FOOTER_SIZE),
    timestamp: Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH),
    creatorApp: CREATOR_APP,
    creatorVersion: CREATOR_VERSION,
    creatorOs: CREATOR_OS,
    originalSize: BigInt(virtualSize),
    currentSize: BigInt(virtualSize),
    geometry: streamGeometry(virtualSize),
    diskType,
    uuid,
    savedState: 0,
  });
}

function parseSubformat(input: StreamInput): 'dynamic' | 'fixed' {
  checkStreamOptions(FORMAT, input.options, ['subformat']);
  const s = input.options.subformat?.trim() ?? 'dynamic';
  if (s !== 'dynamic' && s !== 'fixed') throw new UsageError(`-o subformat=${input.options.subformat}: must be dynamic or fixed`);
  return s;
}

function layout(input: StreamInput): StreamLayout {
  const subformat = parseSubformat(input);
  const vs = input.virtualSize;
  if (vs % VHD_SECTOR !== 0) throw new UnsupportedError(FORMAT, 'virtual size', `${vs} bytes is not a multiple of 512 (VHD counts the size in sectors)`);
  if (vs / VHD_SECTOR > VHD_MAX_SECTORS) throw new UnsupportedError(FORMAT, 'virtual size', `${vs} bytes is above the 2040 GiB VHD maximum`);
  const uuid = randomBytes(16);

  if (subformat === 'fixed') {
    return {
      format: FORMAT,
      parameters: { subformat },
      size: vs + FOOTER_SIZE,
      fullyAllocated: vs + FOOTER_SIZE,
      readBytes: input.data.bytes,
      async write(source, sink) {
        let at = 0;
        for (const [start, end] of input.data) {
          await sink.zeros(start - at);
          await copyGuest(source, sink, start, end);
          at = end;
        }
        await sink.zeros(vs - at);
        await sink.write(footerFor(vs, DISK_FIXED, uuid));
      },
    };
  }

  const bs = STREAM_BLOCK_SIZE;
  const bitmapBytes = qemuBitmapSize(bs);
  const entries = Math.ceil(vs / bs);
  const batBytes = Math.ceil((entries * 4) / VHD_SECTOR) * VHD_SECTOR;
  const blocksStart = BAT_OFFSET + batBytes;
  const units = input.data.units(bs);
  const sizeWith = (blocks: number) => blocksStart + blocks * (bitmapBytes + bs) + FOOTER_SIZE;

  return {
    format: FORMAT,
    parameters: { subformat, block_size: bs },
    size: sizeWith(units.count),
    fullyAllocated: sizeWith(entries),
    readBytes: Math.min(units.count * bs, vs),
    async write(source, sink) {
      const footer = footerFor(vs, DISK_DYNAMIC, uuid);
      await sink.write(footer.slice());
      await sink.write(encodeDynHeader({ tableOffset: BAT_OFFSET, maxTableEntries: entries, blockSize: bs }));
      const bat = new Uint8Array(batBytes).fill(0xff);
      const batv = new DataView(bat.buffer);
      let k = 0;
      for (const [a, b] of unitRanges(units)) {
        for (let u = a; u < b; u++) batv.setUint32(u * 4, (blocksStart + k++ * (bitmapBytes + bs)) / VHD_SECTOR);
      }
      await sink.write(bat);
      // Every sector of a written block is present: other readers (Hyper-V, VirtualBox) honour the bitmap.
      const bitmap = new Uint8Array(bitmapBytes).fill(0xff);
      for (const [a, b] of unitRanges(units)) {
        for (let u = a; u < b; u++) {
          await sink.write(bitmap);
          await copyGuest(source, sink, u * bs, (u + 1) * bs);
        }
      }
      await sink.write(footer);
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// Reading a stream.

/** Reads to the end of the stream and returns its last `n` bytes (fewer when it is shorter). */
async function lastBytes(input: SequentialInput, n: number): Promise<Uint8Array> {
  let tail = new Uint8Array(0);
  for (;;) {
    const piece = await input.readUpTo(1 << 20);
    if (piece.length === 0) return tail;
    const joined = new Uint8Array(Math.min(n, tail.length + piece.length));
    const fromPiece = Math.min(piece.length, joined.length);
    joined.set(tail.subarray(tail.length - (joined.length - fromPiece)), 0);
    joined.set(piece.subarray(piece.length - fromPiece), joined.length - fromPiece);
    tail = joined;
  }
}

/**
 * A fixed VHD: the guest bytes, then the footer. Only the end of the stream tells that it is one, so
 * the data is passed on 512 bytes behind the stream and the footer checked at the end (a stream that
 * turns out not to be a fixed VHD fails then, and unstream removes what it wrote).
 */
function fixedHead(first: Uint8Array): StreamHead {
  return {
    format: FORMAT,
    async readData(input, emit) {
      let held = first; // the last bytes read, which may be the footer
      let guest = 0;
      for (;;) {
        const piece = await input.readUpTo(1 << 20);
        if (piece.length === 0) break;
        const all = new Uint8Array(held.length + piece.length);
        all.set(held, 0);
        all.set(piece, held.length);
        const pass = all.length - FOOTER_SIZE;
        if (pass > 0) {
          await emit(guest, all.slice(0, pass));
          guest += pass;
        }
        held = all.subarray(Math.max(0, pass));
      }
      if (held.length < FOOTER_SIZE || !hasCookie(held, FOOTER_COOKIE)) {
        throw new FormatError(FORMAT, 'footer cookie', printable(Buffer.from(held.subarray(0, 8)).toString('latin1')), 'neither a footer copy at offset 0 (dynamic VHD) nor a footer in the last 512 bytes (fixed VHD)');
      }
      if (!footerChecksumOk(held)) throw new FormatError(FORMAT, 'footer checksum', decodeFooter(held).checksum, 'the footer at the end has a bad checksum');
      const lf = { buf: held, at: guest, footer: decodeFooter(held) };
      if (subformatOf(lf) !== 'fixed') throw new FormatError(FORMAT, 'footer disk type', lf.footer.diskType, 'the footer at the end of a stream without a footer copy at 0 must be a fixed disk\'s');
      const sectors = virtualSectors(lf.footer.creatorApp, lf.footer.geometry, lf.footer.currentSize);
      const vs = Number(sectors) * VHD_SECTOR;
      if (vs > guest) throw new FormatError(FORMAT, 'virtual size', vs, `larger than the ${guest} bytes of data before the footer`);
      return vs;
    },
  };
}

async function readHead(input: SequentialInput): Promise<StreamHead> {
  const buf = await input.readUpTo(FOOTER_SIZE);
  if (!hasCookie(buf, FOOTER_COOKIE)) return fixedHead(buf);
  if (!footerChecksumOk(buf)) throw new FormatError(FORMAT, 'footer checksum', decodeFooter(buf).checksum, 'the footer copy at offset 0 has a bad checksum (QEMU: "Incorrect header checksum")');
  const lf = { buf, at: 0, footer: decodeFooter(buf) };
  const subformat = subformatOf(lf);
  if (subformat === 'differencing') throw new UnsupportedError(FORMAT, 'differencing disk in a stream', 'its parent is not in the stream; stream the collapsed image with imgconv stream');
  const sectors = virtualSectors(lf.footer.creatorApp, lf.footer.geometry, lf.footer.currentSize);
  if (sectors > BigInt(VHD_MAX_SECTORS)) throw new FormatError(FORMAT, 'virtual size', `${sectors * 512n} bytes`, 'above the 2040 GiB VHD maximum (QEMU: EFBIG)');
  const vs = Number(sectors) * VHD_SECTOR;

  const headerOffset = safeU64(lf.footer.dataOffset, FORMAT, 'footer data_offset');
  if (headerOffset < input.position) throw new FormatError(FORMAT, 'footer data_offset', headerOffset, 'the dynamic header must follow the footer copy in a stream');
  await input.skip(headerOffset - input.position, 'bytes before the dynamic header');
  const header = decodeDynHeader(await input.read(DYN_HEADER_SIZE, 'dynamic header'));
  if (header.cookie !== DYN_COOKIE) throw new FormatError(FORMAT, 'dynamic header cookie', printable(header.cookie), `expected "cxsparse" at offset ${headerOffset}`);
  const bs = header.blockSize;
  if (!Number.isInteger(Math.log2(bs)) || bs < 4096) throw new FormatError(FORMAT, 'block_size', bs, 'must be a power of two of at least 4096');
  const entries = header.maxTableEntries;
  if (entries * bs < vs) throw new FormatError(FORMAT, 'max_table_entries', entries, `× block size ${bs} covers less than the virtual size ${vs}`);
  if (entries * 4 > MAX_BAT_BYTES) throw new UnsupportedError(FORMAT, 'BAT size', `${entries} entries exceed the ${MAX_BAT_BYTES}-byte table imgconv reads into memory`);
  const tableOffset = safeU64(header.tableOffset, FORMAT, 'table_offset');
  if (tableOffset < input.position) throw new FormatError(FORMAT, 'table_offset', tableOffset, 'the BAT must follow the dynamic header in a stream');
  await input.skip(tableOffset - input.position, 'bytes before the BAT');
  const batBytes = await input.read(entries * 4, 'BAT');
  const batv = new DataView(batBytes.buffer, batBytes.byteOffset, batBytes.byteLength);
  const tablesEnd = input.position;
  const bitmapBytes = qemuBitmapSize(bs);

  const pieces: { host: number; guest: number; length: number }[] = [];
  for (let k = 0; k < Math.ceil(vs / bs); k++) {
    const entry = batv.getUint32(k * 4);
    if (entry === BAT_UNUSED) continue;
    const at = entry * VHD_SECTOR;
    if (at < tablesEnd) throw new FormatError(FORMAT, 'stream order', at, `BAT entry ${k}: the block lies before the end of the BAT (${tablesEnd}); not a stream (metadata first, then data)`);
    pieces.push({ host: at + bitmapBytes, guest: k * bs, length: Math.min(bs, vs - k * bs) });
  }
  pieces.sort((a, b) => a.host - b.host);
  for (let i = 1; i < pieces.length; i++) {
    if (pieces[i]!.host < pieces[i - 1]!.host + bs) throw new FormatError(FORMAT, 'BAT', pieces[i]!.guest / bs, `the blocks of guest offsets ${pieces[i - 1]!.guest} and ${pieces[i]!.guest} overlap`);
  }

  return {
    format: FORMAT,
    virtualSize: vs,
    dataBytes: pieces.reduce((s, p) => s + p.length, 0),
    async readData(input, emit) {
      let end = tablesEnd;
      for (const p of pieces) {
        await input.skip(p.host - input.position, `the block of guest offset ${p.guest}`);
        for (let done = 0; done < p.length; ) {
          const n = Math.min(p.length - done, 4 << 20);
          await emit(p.guest + done, await input.read(n, `the block of guest offset ${p.guest}`));
          done += n;
        }
        end = p.host + bs;
      }
      // The footer closes the image: the last 512 bytes, after the last block (whole even past the
      // virtual size) and whatever padding a writer left.
      if (end > input.position) await input.skip(end - input.position, 'the end of the last block');
      const footer = await lastBytes(input, FOOTER_SIZE);
      if (footer.length < FOOTER_SIZE || !hasCookie(footer, FOOTER_COOKIE) || !footerChecksumOk(footer)) {
        throw new FormatError(FORMAT, 'footer', input.position - footer.length, 'the stream does not end with a valid footer after the last block (truncated?)');
      }
      return vs;
    },
  };
}

export const vhdStream: StreamTarget = {
  layout,
  reader: { readHead },
};
