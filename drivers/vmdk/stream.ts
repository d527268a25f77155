/**
 * VMDK streamOptimized as a stream, in VMware's stream layout (Virtual Disk Format 5.0, "Stream-
 * Optimized Compressed Sparse Extents" — the form VMware and OVF tools import):
 *
 *   sector 0       header: version 3, flags NL_DETECT|COMPRESSED|MARKERS, gdOffset = GD_AT_END
 *   sectors 1–20   embedded descriptor (createType "streamOptimized"), NUL-padded
 *   … to 64 KiB    zeros (overHead = 128 sectors, where the first grain may start, as QEMU writes it)
 *   grains         for each grain with data, in guest order: a grain marker (LBA, compressed size),
 *                  the zlib stream of the whole grain, zeros to the next sector
 *                  after the last grain of each grain table: a GT marker and the grain table
 *   GD marker + grain directory (entries of tables with no grain stay 0)
 *   footer marker, footer (the header again with the real gdOffset), end-of-stream marker
 *
 * QEMU reads such a file through the footer (vmdk_open_vmdk4: GD_AT_END, footer at end − 1536 with
 * its markers checked) and inflates each grain to exactly one grain (vmdk_read_extent), so a partial
 * last grain is compressed zero-padded to a whole one. Compressed sizes depend on the data, so the
 * layout's size is unknown until the grains are deflated: measure (and --tar) deflate once to count.
 * Deflate runs on libuv's thread pool, several grains at a time, written back in order.
 *
 * Read back (unstream), the markers make the stream self-describing: each grain marker names its
 * guest sector, so grains are written where they belong whatever the tables say; the tables and the
 * footer are skipped (QEMU's own streamOptimized files have their tables up front and no markers
 * around them; both read the same way).
 */
import { randomInt } from 'node:crypto';
import { promisify } from 'node:util';
import { deflate as deflateCb, inflateSync } from 'node:zlib';
import { alignUp, FieldWriter } from '../../src/binary.js';
import { FormatError, UnsupportedError, UsageError } from '../../src/errors.js';
import { unitRanges } from '../../src/stream/collapse.js';
import { checkStreamOptions } from '../../src/stream/copy.js';
import { UNKNOWN_STREAM_SIZE } from '../../src/stream/input.js';
import type { SequentialInput, StreamHead, StreamInput, StreamLayout, StreamTarget } from '../../src/stream/types.js';
import { decodeDescriptor, encodeDescriptor, NO_PARENT_CID, type Descriptor } from './descriptor.js';
import {
  COMPRESSION_DEFLATE,
  decodeSparseHeader,
  encodeSparseHeader,
  FLAG_COMPRESS,
  FLAG_MARKER,
  FLAG_NL_DETECT,
  FORMAT,
  GD_AT_END,
  HEADER_BYTES,
  MAX_SECTOR_FIELD,
  SECTOR,
  validateSparseHeader,
  VMDK4_MAGIC,
  type SparseExtentHeader,
} from './header.js';
import { encodeGrainMarker, encodeMetadataMarker, GRAIN_MARKER_BYTES, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT } from './markers.js';

const deflate = promisify(deflateCb);

const SUBFORMAT = 'streamOptimized';
/** 128 sectors: VMware's and QEMU's grain. */
export const STREAM_GRAIN = 65536;
const GTES_PER_GT = 512;
const GT_BYTES = GTES_PER_GT * 4;
const DESCRIPTOR_SECTORS = 20;
/** Sectors before the first grain (QEMU writes 128 for streamOptimized). */
const OVERHEAD_SECTORS = 128;
/** Grains being deflated at once (libuv's pool has 4 threads; a few more keep it busy). */
const DEFLATE_WINDOW = 8;
/** Grains read from the source at once. */
const READ_GRAINS = 16;
const ADAPTER_TYPES = ['ide', 'buslogic', 'lsilogic', 'legacyESX'];
const KNOWN_OPTIONS = ['subformat', 'adapter_type', 'hwversion', 'toolsversion'];

interface Options {
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
}

function parseOptions(o: Record<string, string>): Options {
  checkStreamOptions(FORMAT, o, KNOWN_OPTIONS);
  if (o.subformat !== undefined && o.subformat.trim() !== SUBFORMAT) {
    throw new UsageError(`-o subformat=${o.subformat}: a VMDK stream is ${SUBFORMAT} (the other subformats need seeking or several files)`);
  }
  const out: Options = { adapterType: 'ide', hwVersion: '4', toolsVersion: '2147483647' };
  if (o.adapter_type !== undefined) {
    if (!ADAPTER_TYPES.includes(o.adapter_type.trim())) throw new UsageError(`-o adapter_type=${o.adapter_type}: must be one of ${ADAPTER_TYPES.join(', ')}`);
    out.adapterType = o.adapter_type.trim();
  }
  if (o.hwversion !== undefined) {
    if (!/^\d{1,3}$/.test(o.hwversion.trim())) throw new UsageError(`-o hwversion=${o.hwversion}: must be a virtual hardware version number (e.g. 4, 6, 21)`);
    out.hwVersion = o.hwversion.trim();
  }
  if (o.toolsversion !== undefined) {
    if (!/^\d{1,10}$/.test(o.toolsversion.trim())) throw new UsageError(`-o toolsversion=${o.toolsversion}: must be a number`);
    out.toolsVersion = o.toolsversion.trim();
  }
  return out;
}

/** zlib's compressBound: the most a deflate stream of `n` bytes can take. */
function deflateBound(n: number): number {
  return n + (n >>> 12) + (n >>> 14) + (n >>> 25) + 13;
}

function streamHeader(capacitySectors: number, gdOffset: bigint): SparseExtentHeader {
  return {
    magic: VMDK4_MAGIC,
    version: 3,
    flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
    capacity: BigInt(capacitySectors),
    grainSize: BigInt(STREAM_GRAIN / SECTOR),
    descriptorOffset: 1n,
    descriptorSize: BigInt(DESCRIPTOR_SECTORS),
    numGTEsPerGT: GTES_PER_GT,
    rgdOffset: 0n,
    gdOffset,
    overHead: BigInt(OVERHEAD_SECTORS),
    uncleanShutdown: 0,
    singleEndLineChar: 0x0a,
    nonEndLineChar: 0x20,
    doubleEndLineChar1: 0x0d,
    doubleEndLineChar2: 0x0a,
    compressAlgorithm: COMPRESSION_DEFLATE,
  };
}

function descriptorArea(o: Options, capacitySectors: number, extentName: string): Uint8Array {
  const heads = o.adapterType === 'ide' ? 16 : 255;
  const d: Descriptor = {
    version: 1,
    // Random, never "no parent" (ffffffff): nothing reads through this image to compare it with.
    cid: randomInt(0, NO_PARENT_CID),
    parentCid: NO_PARENT_CID,
    createType: SUBFORMAT,
    extents: [{ access: 'RW', sectors: capacitySectors, type: 'SPARSE', file: extentName }],
    ddb: [
      ['ddb.virtualHWVersion', o.hwVersion],
      ['ddb.geometry.cylinders', String(Math.floor(capacitySectors / (63 * heads)))],
      ['ddb.geometry.heads', String(heads)],
      ['ddb.geometry.sectors', '63'],
      ['ddb.adapterType', o.adapterType],
      ['ddb.toolsVersion', o.toolsVersion],
    ],
    other: [],
  };
  const text = Buffer.from(encodeDescriptor(d), 'utf8');
  const area = new Uint8Array(DESCRIPTOR_SECTORS * SECTOR);
  // Room for the terminating NUL: QEMU reads the area as a C string.
  if (text.length >= area.length) throw new UsageError(`vmdk: the descriptor (${text.length} bytes) does not fit in ${area.length - 1} bytes; use a shorter --tar or file name`);
  area.set(text, 0);
  return area;
}

function extentNameOf(fileName: string | undefined): string {
  // eslint-disable-next-line no-control-regex
  const name = (fileName ?? 'disk.vmdk').replace(/^.*\//, '').replace(/["\x00-\x1f\x7f]/g, '_');
  return name === '' || name.includes('parentFileNameHint') ? 'disk.vmdk' : name;
}

/** A grain marker and the compressed grain, padded to whole sectors: one buffer. */
function grainRecord(lbaSectors: number, compressed: Uint8Array): Uint8Array {
  const out = new Uint8Array(alignUp(GRAIN_MARKER_BYTES + compressed.length, SECTOR));
  out.set(encodeGrainMarker({ lba: BigInt(lbaSectors), size: compressed.length }), 0);
  out.set(compressed, GRAIN_MARKER_BYTES);
  return out;
}

function u32Table(values: Uint32Array, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  const w = new FieldWriter(out, 'le');
  values.forEach((v, i) => w.u32(i * 4, v));
  return out;
}

function layout(input: StreamInput): StreamLayout {
  const o = parseOptions(input.options);
  const vs = input.virtualSize;
  if (vs % SECTOR !== 0) throw new UnsupportedError(FORMAT, 'virtual size', `${vs} bytes is not a multiple of 512 (VMDK counts the capacity in sectors)`);
  if (vs === 0) throw new UnsupportedError(FORMAT, 'virtual size', 'a sparse extent of capacity 0 is read as a descriptor of other extents');
  const gs = STREAM_GRAIN;
  const capacity = vs / SECTOR;
  const grains = Math.ceil(vs / gs);
  const gdEntries = Math.ceil(grains / GTES_PER_GT);
  const gdBytes = alignUp(gdEntries * 4, SECTOR);
  const units = input.data.units(gs);
  const gtsUsed = new Set<number>();
  for (const [a, b] of unitRanges(units)) for (let t = Math.floor(a / GTES_PER_GT); t <= Math.floor((b - 1) / GTES_PER_GT); t++) gtsUsed.add(t);
  const tail = SECTOR + gdBytes + 3 * SECTOR;
  const fullyAllocated = OVERHEAD_SECTORS * SECTOR + grains * alignUp(GRAIN_MARKER_BYTES + deflateBound(gs), SECTOR) + gdEntries * (SECTOR + GT_BYTES) + tail;
  if (fullyAllocated > MAX_SECTOR_FIELD * SECTOR) {
    throw new UnsupportedError(FORMAT, 'virtual size', `${vs} bytes could make a file beyond the 2 TiB that VMDK's 32-bit sector offsets reach`);
  }
  const extentName = extentNameOf(input.fileName);

  return {
    format: FORMAT,
    parameters: { subformat: SUBFORMAT, grain_size: gs, adapter_type: o.adapterType, hwversion: o.hwVersion },
    size: undefined,
    fullyAllocated,
    readBytes: Math.min(units.count * gs, vs),
    async write(source, sink) {
      const start = sink.position;
      const sectorOf = () => (sink.position - start) / SECTOR;
      await sink.write(encodeSparseHeader(streamHeader(capacity, GD_AT_END)));
      await sink.write(descriptorArea(o, capacity, extentName));
      await sink.zeros(OVERHEAD_SECTORS * SECTOR - HEADER_BYTES - DESCRIPTOR_SECTORS * SECTOR);

      const gd = new Uint32Array(gdEntries);
      let gt: { index: number; entries: Uint32Array } | undefined;
      const writeGt = async () => {
        if (!gt) return;
        await sink.write(encodeMetadataMarker({ numSectors: BigInt(GT_BYTES / SECTOR), size: 0, type: MARKER_GT }));
        gd[gt.index] = sectorOf();
        await sink.write(u32Table(gt.entries, GT_BYTES));
        gt = undefined;
      };
      const writeGrain = async (grain: number, compressed: Uint8Array) => {
        const index = Math.floor(grain / GTES_PER_GT);
        if (gt && gt.index !== index) await writeGt();
        gt ??= { index, entries: new Uint32Array(GTES_PER_GT) };
        gt.entries[grain % GTES_PER_GT] = sectorOf();
        await sink.write(grainRecord((grain * gs) / SECTOR, compressed));
      };

      // Deflate several grains at once on the thread pool; write them back in guest order.
      const inFlight: { grain: number; done: Promise<Uint8Array> }[] = [];
      const settleOne = async () => {
        const next = inFlight.shift()!;
        await writeGrain(next.grain, await next.done);
      };
      for (const [a, b] of unitRanges(units)) {
        for (let g = a; g < b; g += READ_GRAINS) {
          const n = Math.min(READ_GRAINS, b - g);
          const bytes = await source.read(g * gs, n * gs);
          for (let i = 0; i < n; i++) {
            inFlight.push({ grain: g + i, done: deflate(bytes.subarray(i * gs, (i + 1) * gs)) });
            if (inFlight.length >= DEFLATE_WINDOW) await settleOne();
          }
        }
      }
      while (inFlight.length) await settleOne();
      await writeGt();

      await sink.write(encodeMetadataMarker({ numSectors: BigInt(gdBytes / SECTOR), size: 0, type: MARKER_GD }));
      const gdSector = sectorOf();
      await sink.write(u32Table(gd, gdBytes));
      await sink.write(encodeMetadataMarker({ numSectors: 1n, size: 0, type: MARKER_FOOTER }));
      await sink.write(encodeSparseHeader(streamHeader(capacity, BigInt(gdSector))));
      await sink.write(encodeMetadataMarker({ numSectors: 0n, size: 0, type: MARKER_EOS }));
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// Reading a stream.

async function readHead(input: SequentialInput): Promise<StreamHead> {
  const h = decodeSparseHeader(await input.read(HEADER_BYTES, 'header'));
  if (h.magic !== VMDK4_MAGIC) throw new FormatError(FORMAT, 'magic', h.magic, 'not "KDMV": not a sparse VMDK stream');
  // With GD_AT_END the tables are at the end; the header's other fields are those of the footer.
  const g = validateSparseHeader(h.gdOffset === GD_AT_END ? { ...h, gdOffset: h.overHead } : h, UNKNOWN_STREAM_SIZE);
  if (!g.compressed || !g.markers) {
    throw new UnsupportedError(
      FORMAT,
      'sparse extent without markers in a stream',
      'only streamOptimized grains carry their guest sector; a monolithicSparse file must be read through its tables (copy it to a file, then use imgconv inplace or qemu-img convert)',
    );
  }
  if (g.descriptorOffset !== undefined && g.descriptorLength > 0) {
    if (g.descriptorOffset < input.position) throw new FormatError(FORMAT, 'descriptorOffset', h.descriptorOffset, 'the descriptor overlaps the header');
    await input.skip(g.descriptorOffset - input.position, 'bytes before the descriptor');
    const d = decodeDescriptor(await input.read(g.descriptorLength, 'descriptor'), { requireCreateType: false });
    if (d.parentCid !== NO_PARENT_CID && d.parentFileNameHint !== undefined) {
      throw new UnsupportedError(FORMAT, 'delta disk in a stream', `its parent ${JSON.stringify(d.parentFileNameHint)} is not in the stream; stream the collapsed image with imgconv stream`);
    }
  }
  if (g.overHead < input.position) throw new FormatError(FORMAT, 'overHead', h.overHead, `the first grain would lie inside the header and descriptor (before byte ${input.position})`);
  await input.skip(g.overHead - input.position, 'bytes before the first grain');
  const vs = g.virtualSize;
  const gs = g.grainBytes;

  return {
    format: FORMAT,
    virtualSize: vs,
    async readData(input, emit) {
      for (;;) {
        const at = input.position;
        const sector = await input.read(SECTOR, 'marker (the stream ends without an end-of-stream marker)');
        const dv = new DataView(sector.buffer, sector.byteOffset, SECTOR);
        const value = Number(dv.getBigUint64(0, true));
        const size = dv.getUint32(8, true);
        if (size === 0) {
          const type = dv.getUint32(12, true);
          if (type === MARKER_EOS) return vs;
          if (type === MARKER_GT || type === MARKER_GD || type === MARKER_FOOTER) {
            await input.skip(value * SECTOR, type === MARKER_FOOTER ? 'footer' : type === MARKER_GT ? 'grain table' : 'grain directory');
            continue;
          }
          throw new FormatError(FORMAT, 'marker type', type, `unknown metadata marker at ${at}`);
        }
        const guest = value * SECTOR;
        if (size > 2 * gs) throw new FormatError(FORMAT, 'grain marker size', size, `at ${at}: more than twice the ${gs}-byte grain`);
        if (guest % gs !== 0 || guest >= vs) throw new FormatError(FORMAT, 'grain marker LBA', value, `at ${at}: not the start of a grain inside the ${vs}-byte disk`);
        const record = alignUp(GRAIN_MARKER_BYTES + size, SECTOR);
        const payload = new Uint8Array(size);
        payload.set(sector.subarray(GRAIN_MARKER_BYTES, Math.min(SECTOR, GRAIN_MARKER_BYTES + size)), 0);
        if (record > SECTOR) {
          const rest = await input.read(record - SECTOR, `the grain at guest offset ${guest}`);
          payload.set(rest.subarray(0, size - (SECTOR - GRAIN_MARKER_BYTES)), SECTOR - GRAIN_MARKER_BYTES);
        }
        let out: Buffer;
        try {
          out = inflateSync(payload, { maxOutputLength: gs });
        } catch (e) {
          throw new FormatError(FORMAT, 'compressed grain', at, `does not inflate to at most one grain (${gs} bytes): ${(e as Error).message}`);
        }
        const needed = Math.min(gs, vs - guest);
        if (out.length < needed) throw new FormatError(FORMAT, 'compressed grain', at, `inflates to ${out.length} bytes, less than the ${needed} bytes of its grain`);
        await emit(guest, new Uint8Array(out.buffer, out.byteOffset, needed));
      }
    },
  };
}

export const vmdkStream: StreamTarget = {
  layout,
  reader: { readHead },
};
