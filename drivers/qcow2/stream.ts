/**
 * qcow2 as a stream, laid out as QEMU's scripts/qcow2-to-stdout.py lays it out: cluster 0 (header),
 * the refcount table, the refcount blocks, the L1 table, the L2 tables that map something, then the
 * data clusters in guest order. Every cluster of the file is referenced exactly once, so the file is
 * clusters [0, total) with refcount 1 each; the refcount structures count themselves, so their number
 * is found as a fixed point (more clusters → more refblocks → more clusters …).
 *
 * Read back (unstream), the header is decoded and validated by the driver's own open (readLayout),
 * the L2 tables are read in ascending file order, and a stream is accepted only when every data
 * cluster comes after every table that maps it — the order this writer and QEMU's script produce.
 */
import { inflateRawSync, constants as zc } from 'node:zlib';
import { readAt } from '../../src/blockdev/types.js';
import { FormatError, UnsupportedError, UsageError } from '../../src/errors.js';
import { unitRanges } from '../../src/stream/collapse.js';
import { copyGuest } from '../../src/stream/copy.js';
import { StreamDevice } from '../../src/stream/input.js';
import type { SequentialInput, StreamHead, StreamInput, StreamLayout, StreamTarget } from '../../src/stream/types.js';
import { encodeL1Entry, encodeL2Entry, encodeReftableEntry, setRefcount } from './entries.js';
import { COMPRESSION_ZSTD, CRYPT_NONE, FORMAT, MAX_L1_BYTES, MAX_REFTABLE_BYTES, decodeHeader } from './header.js';
import { readLayout } from './open.js';
import { activeMapping, l1EntryL2Offset, readL1 } from './tables.js';
import { encodeCluster0, parseQcow2Options, type Qcow2TargetParams } from './target.js';

const DEFAULT_CLUSTER = 65536;

/** How many clusters of each kind the streamed file has, and where each kind starts. */
export interface Qcow2StreamCounts {
  l1Entries: number;
  reftableClusters: number;
  refblocks: number;
  l1Clusters: number;
  l2Tables: number;
  dataClusters: number;
  /** Clusters in the file: all of them referenced once. */
  total: number;
}

/** The clusters of each kind, the refcount structures found to a fixed point (they count themselves). */
export function qcow2StreamCounts(cs: number, refcountOrder: number, l1Entries: number, l2Tables: number, dataClusters: number): Qcow2StreamCounts {
  const l1Clusters = Math.ceil((l1Entries * 8) / cs);
  const perBlock = (cs * 8) / (1 << refcountOrder);
  const perTable = cs / 8;
  let refblocks = 0;
  let reftableClusters = 0;
  for (;;) {
    const total = 1 + reftableClusters + refblocks + l1Clusters + l2Tables + dataClusters;
    const rb = Math.ceil(total / perBlock);
    const rt = Math.ceil(rb / perTable);
    if (rb === refblocks && rt === reftableClusters) return { l1Entries, reftableClusters, refblocks, l1Clusters, l2Tables, dataClusters, total };
    refblocks = rb;
    reftableClusters = rt;
  }
}

/** The L1 indexes whose L2 table maps at least one of the allocated clusters, ascending. */
function l2IndexesOf(ranges: Iterable<[number, number]>, entriesPerL2: number): number[] {
  const out: number[] = [];
  for (const [a, b] of ranges) {
    for (let t = Math.floor(a / entriesPerL2); t <= Math.floor((b - 1) / entriesPerL2); t++) {
      if (out[out.length - 1] !== t) out.push(t);
    }
  }
  return out;
}

function streamParams(input: StreamInput): Qcow2TargetParams {
  const o = parseQcow2Options(input.options);
  return { clusterSize: o.clusterSize ?? DEFAULT_CLUSTER, version: o.version, refcountOrder: o.refcountOrder, lazyRefcounts: o.lazyRefcounts };
}

function layout(input: StreamInput): StreamLayout {
  const p = streamParams(input);
  const cs = p.clusterSize;
  const vs = input.virtualSize;
  if (vs % 512 !== 0) throw new UnsupportedError(FORMAT, 'virtual size', `${vs} bytes is not a multiple of 512 (qcow2 counts the size in sectors)`);
  const entriesPerL2 = cs / 8;
  const l1Entries = Math.ceil(vs / (cs * entriesPerL2));
  if (l1Entries * 8 > MAX_L1_BYTES) {
    throw new UsageError(`qcow2: ${vs} bytes needs an L1 table larger than QEMU's ${MAX_L1_BYTES}-byte limit with ${cs}-byte clusters; use -o cluster_size=… larger`);
  }
  const units = input.data.units(cs);
  const l2Indexes = l2IndexesOf(unitRanges(units), entriesPerL2);
  const c = qcow2StreamCounts(cs, p.refcountOrder, l1Entries, l2Indexes.length, units.count);
  const full = qcow2StreamCounts(cs, p.refcountOrder, l1Entries, l1Entries, Math.ceil(vs / cs));
  if (c.reftableClusters * cs > MAX_REFTABLE_BYTES) {
    throw new UnsupportedError(FORMAT, 'refcount table size', `${c.reftableClusters * cs} bytes exceeds QEMU's limit of ${MAX_REFTABLE_BYTES}; use larger clusters or fewer refcount bits`);
  }
  const reftableOffset = cs;
  const refblockOffset = reftableOffset + c.reftableClusters * cs;
  const l1Offset = refblockOffset + c.refblocks * cs;
  const l2Offset = l1Offset + c.l1Clusters * cs;
  const dataOffset = l2Offset + c.l2Tables * cs;
  const bits = Math.log2(cs);

  return {
    format: FORMAT,
    parameters: { cluster_size: cs, compat: p.version === 3 ? '1.1' : '0.10', refcount_bits: 1 << p.refcountOrder },
    size: c.total * cs,
    fullyAllocated: full.total * cs,
    readBytes: Math.min(units.count * cs, vs),
    async write(source, sink) {
      await sink.write(encodeCluster0(p, vs, undefined, { l1Entries, l1Offset: c.l1Clusters > 0 ? l1Offset : 0, reftableOffset, reftableClusters: c.reftableClusters }));

      const reftable = new Uint8Array(c.reftableClusters * cs);
      const rtv = new DataView(reftable.buffer);
      for (let k = 0; k < c.refblocks; k++) {
        const [hi, lo] = encodeReftableEntry({ offset: refblockOffset + k * cs, reserved: 0 });
        rtv.setUint32(k * 8, hi);
        rtv.setUint32(k * 8 + 4, lo);
      }
      await sink.write(reftable);

      const perBlock = (cs * 8) / (1 << p.refcountOrder);
      for (let k = 0; k < c.refblocks; k++) {
        const block = new Uint8Array(cs);
        const n = Math.min(perBlock, c.total - k * perBlock);
        for (let i = 0; i < n; i++) setRefcount(block, i, p.refcountOrder, 1);
        await sink.write(block);
      }

      const l1 = new Uint8Array(c.l1Clusters * cs);
      const l1v = new DataView(l1.buffer);
      l2Indexes.forEach((t, j) => {
        const [hi, lo] = encodeL1Entry({ l2Offset: l2Offset + j * cs, copied: true, reserved: 0n });
        l1v.setUint32(t * 8, hi);
        l1v.setUint32(t * 8 + 4, lo);
      });
      await sink.write(l1);

      // L2 tables in L1 order; the k-th allocated cluster (guest order) is the k-th data cluster.
      let table: { index: number; dv: DataView; bytes: Uint8Array } | undefined;
      let ordinal = 0;
      for (const [a, b] of unitRanges(units)) {
        for (let u = a; u < b; u++) {
          const index = Math.floor(u / entriesPerL2);
          if (table?.index !== index) {
            if (table) await sink.write(table.bytes);
            const bytes = new Uint8Array(cs);
            table = { index, dv: new DataView(bytes.buffer), bytes };
          }
          const [hi, lo] = encodeL2Entry({ compressed: false, copied: true, offset: dataOffset + ordinal * cs, zero: false, reserved: 0n }, bits);
          const at = (u % entriesPerL2) * 8;
          table.dv.setUint32(at, hi);
          table.dv.setUint32(at + 4, lo);
          ordinal++;
        }
      }
      if (table) await sink.write(table.bytes);

      // Whole clusters: a last cluster past the virtual size is padded with zeros.
      for (const [a, b] of unitRanges(units)) await copyGuest(source, sink, a * cs, b * cs);
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// Reading a stream.

type Piece = { host: number; guest: number; length: number; compressed: false } | { host: number; guest: number; length: number; compressed: true; hostLength: number };

async function readHead(input: SequentialInput): Promise<StreamHead> {
  const dev = new StreamDevice(input, 'qcow2 stream', FORMAT);
  const first = decodeHeader(await readAt(dev, 0, 112));
  // Checked before readLayout, which would look for the snapshot table wherever it lies.
  if (first.nbSnapshots > 0) throw new UnsupportedError(FORMAT, 'internal snapshots in a stream', `${first.nbSnapshots} snapshot(s): only the active layer can be read from a pipe; stream the image with imgconv stream or qemu-img convert first`);
  const layout = await readLayout(dev);
  const h = layout.header;
  if (layout.backingFile !== undefined) {
    throw new UnsupportedError(FORMAT, 'backing file in a stream', `the stream names backing file ${JSON.stringify(layout.backingFile)}; a streamed image must be standalone (imgconv stream collapses the chain)`);
  }
  if (layout.dataFileName !== undefined) throw new UnsupportedError(FORMAT, 'external data file in a stream', `the data lives in ${JSON.stringify(layout.dataFileName)}, not in the stream`);
  if (h.cryptMethod !== CRYPT_NONE) throw new UnsupportedError(FORMAT, 'encryption', `crypt_method ${h.cryptMethod}: encrypted data cannot be written out as plain guest data`);
  const cs = layout.clusterSize;

  // The L2 tables in file order, so the stream passes each once; activeMapping then finds them kept.
  const l1 = await readL1(layout, h.l1TableOffset, h.l1Size, 'l1_size', 'l1_table_offset');
  const needed = Math.ceil(layout.virtualSize / (cs * layout.l2Entries));
  const l2Offsets = new Set<number>();
  for (let i = 0; i < needed; i++) {
    const off = l1EntryL2Offset(layout, l1, i, 'L1');
    if (off !== 0) l2Offsets.add(off);
  }
  for (const off of [...l2Offsets].sort((a, b) => a - b)) await readAt(dev, off, cs);
  const map = await activeMapping(layout);
  dev.release();
  const tablesEnd = input.position;

  const pieces: Piece[] = [];
  let dataBytes = 0;
  for (const e of map) {
    if (e.kind === 'data') pieces.push({ host: e.host!, guest: e.guest, length: e.length, compressed: false });
    else if (e.kind === 'compressed') pieces.push({ host: e.host!, guest: e.guest, length: e.length, compressed: true, hostLength: e.hostLength! });
    else continue;
    dataBytes += e.length;
  }
  for (const p of pieces) {
    if (p.host < tablesEnd) {
      throw new FormatError(
        FORMAT,
        'stream order',
        p.host,
        `the data of guest offset ${p.guest} lies before the end of the tables that map it (${tablesEnd}): not a stream (metadata first, then data); copy it to a file and use imgconv inplace or qemu-img convert`,
      );
    }
  }
  if (h.compressionType === COMPRESSION_ZSTD && pieces.some((p) => p.compressed)) {
    throw new UnsupportedError(FORMAT, 'zstd compression', 'Node has no zstd decoder; convert with qemu-img to zlib first');
  }
  pieces.sort((a, b) => a.host - b.host || a.guest - b.guest);

  return {
    format: FORMAT,
    virtualSize: layout.virtualSize,
    dataBytes,
    async readData(input, emit) {
      // The last compressed payload read: the next may share its last sector.
      let last: { host: number; bytes: Uint8Array } | undefined;
      for (const p of pieces) {
        if (!p.compressed) {
          if (p.host < input.position) {
            // A cluster shared by two guest clusters (refcount 2) comes once in the stream.
            throw new FormatError(FORMAT, 'data cluster offset', p.host, `guest offset ${p.guest} maps host bytes the stream has already passed (shared clusters cannot be read from a pipe)`);
          }
          await input.skip(p.host - input.position, `the data of guest offset ${p.guest}`);
          // Whole clusters only: a file may end inside its last cluster (QEMU reads the rest as
          // zeros), but a stream that does was cut short, and its data would silently become zeros.
          for (let done = 0; done < p.length; ) {
            const n = Math.min(p.length - done, 4 << 20);
            await emit(p.guest + done, await input.read(n, `the data of guest offset ${p.guest + done}`));
            done += n;
          }
          continue;
        }
        const payload = new Uint8Array(p.hostLength);
        let have = 0;
        if (p.host < input.position) {
          if (!last || p.host < last.host || p.host >= last.host + last.bytes.length) {
            throw new FormatError(FORMAT, 'compressed cluster offset', p.host, `guest offset ${p.guest}: the payload lies in bytes the stream has already passed`);
          }
          const from = last.bytes.subarray(p.host - last.host, Math.min(last.bytes.length, p.host - last.host + p.hostLength));
          payload.set(from, 0);
          have = from.length;
        } else {
          await input.skip(p.host - input.position, `the compressed data of guest offset ${p.guest}`);
        }
        if (have < p.hostLength) payload.set(await input.read(p.hostLength - have, `the compressed data of guest offset ${p.guest}`), have);
        last = { host: p.host, bytes: payload };
        let out: Buffer;
        try {
          out = inflateRawSync(payload, { maxOutputLength: cs, finishFlush: zc.Z_SYNC_FLUSH });
        } catch (e) {
          throw new FormatError(FORMAT, 'compressed cluster', p.host, `does not inflate to one ${cs}-byte cluster: ${(e as Error).message}`);
        }
        if (out.length !== cs) throw new FormatError(FORMAT, 'compressed cluster', p.host, `inflates to ${out.length} bytes, not one ${cs}-byte cluster`);
        const within = p.guest % cs;
        await emit(p.guest, new Uint8Array(out.buffer, out.byteOffset + within, p.length));
      }
      return layout.virtualSize;
    },
  };
}

export const qcow2Stream: StreamTarget = {
  layout,
  reader: { readHead },
};
