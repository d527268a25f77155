/**
 * qcow2 with an external raw data file as a conversion target (`-o data_file_raw=on`): the image file
 * becomes the data file, byte for byte the guest disk (data at host = guest: raw and VHD fixed as they
 * are, other sources relocated there first — the engine's identity placement), and a small qcow2 file
 * created beside it at the commit point maps it 1:1 — a companion file, like VMDK monolithicFlat's
 * descriptor (the engine carries its bytes in the COMMIT journal record).
 *
 * The metadata file is what `qemu-img create -f qcow2 -o data_file=X,data_file_raw=on,preallocation=metadata`
 * writes [qcow2.txt: incompatible feature bit 2 "external data file", autoclear bit 1 "raw external
 * data", header extension 0x44415441 with the data file's name]:
 * - version 3 (external data files need it), no backing file (QEMU refuses data_file_raw with one);
 * - every guest cluster allocated at the identical offset of the data file, L2 entries with COPIED
 *   (offset 0 with COPIED is guest cluster 0 — valid only with a data file); no compressed clusters,
 *   no zero flags: with data_file_raw the data file alone must read as the disk;
 * - refcounts cover only the qcow2 file's own clusters (header, L1, L2s, reftable, refblocks);
 * - the data file's name is stored as the image's file name, relative to the metadata file, which the
 *   engine creates in the same directory. (QEMU 7.2 resolves a relative data file name against its
 *   working directory; run qemu from the images' directory, or give it `data-file` explicitly.)
 *
 * The metadata travels base64 in the COMMIT record, whose JSON part recovery reads back up to MAX_JSON:
 * by default the cluster size is the smallest from 64 KiB whose metadata stays within 16 MiB (64 KiB below
 * 128 GiB disks, 2 MiB below 4 TiB), else the first that fits the record at all (MAX_METADATA, ≈ 47 MiB:
 * about 11 TiB at 2 MiB); an explicit -o cluster_size is honoured, and a size whose metadata would not fit
 * is refused before anything is written.
 */
import { basename, dirname, resolve } from 'node:path';
import type { PlanInput, TargetBuild, TargetPlan } from '../../src/driver.js';
import { GapAllocator } from '../../src/engine/allocator.js';
import type { ClusterRun } from '../../src/engine/clusters.js';
import { MAX_JSON } from '../../src/engine/journal.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { FORMAT, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES } from './header.js';
import { cluster0Bytes, encodeCluster0, encodeTables, layOut, parseQcow2Options, type DataFileRef, type Qcow2TargetParams } from './target.js';

/** The options that ask for (and shape) the data-file layout; the rest are the ordinary qcow2 options. */
export const DATA_FILE_OPTIONS = ['data_file', 'data_file_raw', 'metadata_file'];

const DEFAULT_CLUSTER = 65536;
const MAX_CLUSTER = 2 ** MAX_CLUSTER_BITS;
/** Default cluster size choice: the smallest whose metadata stays within this. */
export const COMFORTABLE_METADATA = 16 << 20;
/** The largest metadata file the COMMIT record can carry: base64 (4/3) inside MAX_JSON, 1 MiB left for the rest of the record. */
export const MAX_METADATA = Math.floor((MAX_JSON - (1 << 20)) / 4) * 3;

export function wantsDataFile(options: Record<string, string>): boolean {
  return DATA_FILE_OPTIONS.some((k) => options[k] !== undefined);
}

/**
 * The metadata file's default name beside `image`: its stem + `.qcow2` (disk.raw → disk.qcow2, disk →
 * disk.qcow2), or stem-metadata.qcow2 when that is the image itself.
 */
export function dataFileMetadataName(image: string): string {
  const base = basename(image);
  const stem = base.includes('.') && base.lastIndexOf('.') > 0 ? base.slice(0, base.lastIndexOf('.')) : base;
  const name = `${stem}.qcow2`;
  return name === base ? `${stem}-metadata.qcow2` : name;
}

function optionError(name: string, value: string, why: string): UsageError {
  return new UsageError(`-o ${name}=${value}: ${why}`);
}

// eslint-disable-next-line no-control-regex
const BAD_NAME = /[\x00-\x1f\x7f]/;

interface DataFileOptions {
  params: Omit<Qcow2TargetParams, 'clusterSize'> & { clusterSize?: number };
  /** The data file's name as stored (the image's file name). */
  dataFile: string;
  /** The metadata file's name, in the image's directory. */
  metadataFile: string;
}

function parseDataFileOptions(input: PlanInput): DataFileOptions {
  const o = input.options;
  const rest: Record<string, string> = {};
  for (const [k, v] of Object.entries(o)) if (!DATA_FILE_OPTIONS.includes(k)) rest[k] = v;
  const params = parseQcow2Options(rest);
  const raw = o.data_file_raw?.trim().toLowerCase();
  if (raw === undefined) {
    throw new UsageError(
      `-o ${o.data_file !== undefined ? `data_file=${o.data_file}` : `metadata_file=${o.metadata_file}`}: in place, the image itself becomes the external data file and stays a raw disk; add -o data_file_raw=on`,
    );
  }
  if (raw === 'off' || raw === 'false' || raw === 'no') {
    throw optionError('data_file_raw', o.data_file_raw!, 'in place, the image itself becomes the external data file and stays a raw disk, so only data_file_raw=on is made');
  }
  if (raw !== 'on' && raw !== 'true' && raw !== 'yes') throw optionError('data_file_raw', o.data_file_raw!, 'must be on or off');
  if (input.path === undefined) throw new UsageError('-o data_file_raw=on needs the image path (the qcow2 metadata file names it)');
  const image = basename(input.path);
  if (o.data_file !== undefined) {
    const d = o.data_file.trim();
    if (d === '' || resolve(dirname(input.path), d) !== resolve(input.path)) {
      throw optionError('data_file', o.data_file, `in place, the data file is the image itself (${image}); leave data_file out or name the image`);
    }
  }
  if (BAD_NAME.test(image)) throw new UnsupportedError(FORMAT, 'data file name', `${JSON.stringify(image)}: a file name with control characters cannot be stored; rename the image first`);
  if (params.version !== 3) throw optionError('compat', o.compat!, 'an external data file needs compat=1.1');
  let metadataFile = dataFileMetadataName(input.path);
  if (o.metadata_file !== undefined) {
    const m = o.metadata_file.trim();
    if (m === '' || m.includes('/') || m === '.' || m === '..' || BAD_NAME.test(m)) {
      throw optionError('metadata_file', o.metadata_file, 'must be a plain file name (no directory or control characters); the qcow2 file is created beside the image');
    }
    if (m === image) throw optionError('metadata_file', o.metadata_file, 'names the image itself, which becomes the data file');
    metadataFile = m;
  }
  return { params, dataFile: image, metadataFile };
}

// ---------------------------------------------------------------------------------------------------
// Layout of the metadata file: its own fresh file, every guest cluster mapped to the same offset.

function allData(virtualSize: number): ClusterRun[] {
  return virtualSize > 0 ? [{ guest: 0, length: virtualSize, kind: 'data', host: 0 }] : [];
}

function layOutMetadata(p: Qcow2TargetParams, virtualSize: number) {
  const cs = p.clusterSize;
  return layOut(p, allData(virtualSize), virtualSize, new GapAllocator([], [{ start: 0, length: cs }], cs), true);
}

/** A lower bound of the metadata file's size (header, L1, every L2 table), without laying it out. */
function metadataLowerBound(cs: number, virtualSize: number): number {
  const span = cs * (cs / 8);
  const l2 = Math.ceil(virtualSize / span);
  return cs * (1 + Math.ceil((l2 * 8) / cs) + l2);
}

/** The metadata file's exact size at this cluster size, or why it cannot be used. */
function metadataSize(p: Qcow2TargetParams, virtualSize: number, dataFile: DataFileRef): number | string {
  const cs = p.clusterSize;
  const span = cs * (cs / 8);
  if (Math.ceil(virtualSize / span) * 8 > MAX_L1_BYTES) return `${virtualSize} bytes needs an L1 table larger than QEMU's ${MAX_L1_BYTES}-byte limit with ${cs}-byte clusters`;
  if (cluster0Bytes(p.version, undefined, dataFile) > cs) return `the header and the data file name do not fit in one ${cs}-byte cluster`;
  const bound = metadataLowerBound(cs, virtualSize);
  if (bound > MAX_METADATA) return `the qcow2 metadata would take at least ${bound} bytes with ${cs}-byte clusters, more than the ${MAX_METADATA} the commit journal record carries`;
  try {
    const size = layOutMetadata(p, virtualSize).finalLength;
    if (size > MAX_METADATA) return `the qcow2 metadata would take ${size} bytes with ${cs}-byte clusters, more than the ${MAX_METADATA} the commit journal record carries`;
    return size;
  } catch (e) {
    if (e instanceof UnsupportedError) return e.message;
    throw e;
  }
}

export function planDataFile(input: PlanInput): TargetPlan {
  const { virtualSize, backing } = input.info;
  if (backing) {
    throw new UnsupportedError(
      FORMAT,
      'backing file',
      `a qcow2 with a raw external data file has no backing file (QEMU refuses data_file_raw with one), and this image reads part of its content from ${backing.filename}; flatten it first (qemu-img rebase -b ""), or convert to a qcow2 without data_file_raw, which keeps the backing file`,
    );
  }
  if (virtualSize % 512 !== 0) throw new UnsupportedError(FORMAT, 'virtual size', `${virtualSize} bytes is not a multiple of 512 (qcow2 counts the size in sectors)`);
  const o = parseDataFileOptions(input);
  const ref: DataFileRef = { name: o.dataFile, raw: true };
  let chosen: { cs: number; size: number } | undefined;
  if (o.params.clusterSize !== undefined) {
    const size = metadataSize({ ...o.params, clusterSize: o.params.clusterSize }, virtualSize, ref);
    if (typeof size === 'string') throw optionError('cluster_size', input.options.cluster_size!, size);
    chosen = { cs: o.params.clusterSize, size };
  } else {
    let last = '';
    let fits: { cs: number; size: number } | undefined;
    for (let cs = DEFAULT_CLUSTER; cs <= MAX_CLUSTER; cs *= 2) {
      const size = metadataSize({ ...o.params, clusterSize: cs }, virtualSize, ref);
      if (typeof size === 'string') {
        last = size;
        continue;
      }
      fits ??= { cs, size };
      if (size <= COMFORTABLE_METADATA) {
        chosen = { cs, size };
        break;
      }
    }
    // No size is comfortable: the first that fits the journal at all.
    chosen ??= fits;
    if (!chosen) throw new UnsupportedError(FORMAT, 'image', `no cluster size can map this disk from a metadata file the journal can carry: ${last}`);
  }
  return {
    format: FORMAT,
    parameters: {
      cluster_size: chosen.cs,
      compat: '1.1',
      refcount_bits: 1 << o.params.refcountOrder,
      lazy_refcounts: o.params.lazyRefcounts,
      data_file: o.dataFile,
      data_file_raw: true,
      metadata_file: o.metadataFile,
    },
    fixedRegions: [],
    mustMove: [],
    dataAlignment: 512,
    placement: 'identity',
    companion: o.metadataFile,
    dropped: [],
    metadataBytes: chosen.size,
  };
}

/** The whole metadata file, as the companion's bytes; the image (the data file) is left as the identity placement made it. */
export function buildDataFile(plan: TargetPlan, input: PlanInput): TargetBuild {
  const q = plan.parameters;
  const p: Qcow2TargetParams = { clusterSize: q.cluster_size as number, version: 3, refcountOrder: Math.log2(q.refcount_bits as number), lazyRefcounts: q.lazy_refcounts === true };
  const { virtualSize } = input.info;
  const layout = layOutMetadata(p, virtualSize);
  if (layout.reftableClusters * p.clusterSize > MAX_REFTABLE_BYTES) throw new Error('qcow2 data file build: refcount table beyond the limit; plan() should have refused');
  const bytes = new Uint8Array(layout.finalLength);
  bytes.set(
    encodeCluster0(
      p,
      virtualSize,
      undefined,
      { l1Entries: layout.l1Entries, l1Offset: layout.l1Offset, reftableOffset: layout.reftableOffset, reftableClusters: layout.reftableClusters },
      { name: q.data_file as string, raw: true },
    ),
    0,
  );
  for (const w of encodeTables(p, layout, allData(virtualSize))) bytes.set(w.bytes, w.offset);
  return { writes: [], fixed: [], finalLength: virtualSize, metadataBytes: bytes.length, companion: bytes };
}
