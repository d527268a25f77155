/**
 * QED as a conversion target: lays out a header cluster, an L1 table and the L2 tables that the
 * mapping needs, pointing every data cluster at the host offset where its data already lies.
 * Chooses the cluster size that moves the fewest bytes (data clusters must be cluster-aligned and
 * above the header area), preferring QEMU's default of 64 KiB; table_size grows from QEMU's default 4
 * until the image size is addressable.
 */
import { alignUp, isPowerOfTwo } from '../../src/binary.js';
import type { Allocator, HostWrite, PlanInput, TargetBuild, TargetDriver, TargetPlan } from '../../src/driver.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { cheapestClusterSize, clusterize, powersOfTwo } from '../../src/engine/clusters.js';
import {
  QED,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_HEADER_BYTES,
  QED_MAGIC,
  QED_MAX_BACKING_NAME,
  QED_MAX_CLUSTER_SIZE,
  QED_MAX_TABLE_SIZE,
  QED_MIN_CLUSTER_SIZE,
  encodeHeader,
  qedMaxImageSize,
} from './header.js';
import { QED_ZERO_CLUSTER } from './tables.js';

const DEFAULT_CLUSTER = 65536;
const DEFAULT_TABLE_SIZE = 4;
const KNOWN_OPTIONS = new Set(['cluster_size', 'table_size']);

function parseSizeOption(name: string, v: string): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(v.trim());
  if (!m) throw new UsageError(`-o ${name}=${v}: not a size (use e.g. 65536 or 64k)`);
  const mult = { '': 1, k: 1024, m: 1 << 20, g: 1 << 30 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * mult;
}

function headerClusters(cs: number, backingName: string | undefined): number {
  return Math.ceil((QED_HEADER_BYTES + Buffer.byteLength(backingName ?? '', 'utf8')) / cs);
}

function chooseTableSize(cs: number, virtualSize: number, forced: number | undefined): number {
  if (forced !== undefined) {
    if (!isPowerOfTwo(forced) || forced < 1 || forced > QED_MAX_TABLE_SIZE) throw new UsageError(`-o table_size=${forced}: must be a power of two from 1 to ${QED_MAX_TABLE_SIZE}`);
    if (qedMaxImageSize(cs, forced) < BigInt(virtualSize)) throw new UsageError(`-o table_size=${forced}: too small to address ${virtualSize} bytes with ${cs}-byte clusters`);
    return forced;
  }
  // table_size=1 images cannot be opened by QEMU (its table-offset check), so never choose it.
  for (let ts = DEFAULT_TABLE_SIZE; ts <= QED_MAX_TABLE_SIZE; ts *= 2) if (qedMaxImageSize(cs, ts) >= BigInt(virtualSize)) return ts;
  throw new UnsupportedError(QED, 'virtual size', `${virtualSize} bytes is more than QED can address with ${cs}-byte clusters`);
}

export const qedTarget: TargetDriver = {
  // No refcounts: qed-check counts every unreferenced cluster below the file end as leaked.
  unreferencedIsLeak: true,

  plan(input: PlanInput): TargetPlan {
    for (const k of Object.keys(input.options)) if (!KNOWN_OPTIONS.has(k)) throw new UsageError(`qed has no option "${k}" (known: ${[...KNOWN_OPTIONS].join(', ')})`);
    const backing = input.info.backing;
    if (backing && Buffer.byteLength(backing.filename, 'utf8') > QED_MAX_BACKING_NAME) {
      throw new UnsupportedError(QED, 'backing file name', `${backing.filename.length} bytes is longer than QED allows (${QED_MAX_BACKING_NAME})`);
    }
    const forcedCs = input.options.cluster_size !== undefined ? parseSizeOption('cluster_size', input.options.cluster_size) : undefined;
    if (forcedCs !== undefined && (!isPowerOfTwo(forcedCs) || forcedCs < QED_MIN_CLUSTER_SIZE || forcedCs > QED_MAX_CLUSTER_SIZE)) {
      throw new UsageError(`-o cluster_size=${input.options.cluster_size}: QED needs a power of two from 4 KiB to 64 MiB`);
    }
    const forcedTs = input.options.table_size !== undefined ? Number(input.options.table_size) : undefined;
    const sizes = forcedCs ? [forcedCs] : powersOfTwo(QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
    const candidates = sizes.flatMap((cs) => {
      let ts: number;
      try {
        ts = chooseTableSize(cs, input.info.virtualSize, forcedTs);
      } catch (e) {
        if (forcedCs) throw e;
        return []; // this cluster size cannot address the disk
      }
      const headerBytes = headerClusters(cs, backing?.filename) * cs;
      const c = clusterize(input.mapping, cs, { reserved: [{ start: 0, length: headerBytes }], hasBacking: backing !== undefined });
      const tableBytes = ts * cs;
      const metadataBytes = headerBytes + tableBytes * (1 + countL2(c.runs, (tableBytes / 8) * cs));
      return [{ ...c, cs, ts, headerBytes, metadataBytes }];
    });
    if (candidates.length === 0) throw new UnsupportedError(QED, 'virtual size', `${input.info.virtualSize} bytes is more than QED can address`);
    const cs = cheapestClusterSize(candidates, DEFAULT_CLUSTER, input.info.virtualSize);
    const chosen = candidates.find((c) => c.cs === cs)!;
    const ts = chosen.ts;
    return {
      format: QED,
      parameters: { cluster_size: cs, table_size: ts, header_size: chosen.headerBytes / cs },
      fixedRegions: [{ start: 0, length: chosen.headerBytes, what: 'QED header' }],
      mustMove: chosen.mustMove,
      dataAlignment: cs,
      dropped: [],
      metadataBytes: chosen.metadataBytes,
    };
  },

  build(plan: TargetPlan, input: PlanInput, alloc: Allocator): TargetBuild {
    const cs = plan.parameters.cluster_size as number;
    const ts = plan.parameters.table_size as number;
    const headerClustersN = plan.parameters.header_size as number;
    const headerBytes = headerClustersN * cs;
    const backing = input.info.backing;
    const layout = clusterize(input.mapping, cs, { reserved: [{ start: 0, length: headerBytes }], hasBacking: backing !== undefined });
    if (layout.mustMove.length) throw new Error(`qed build: ${layout.mustMove.length} ranges still need moving (engine bug)`);
    const tableBytes = ts * cs;
    const entriesPerTable = tableBytes / 8;
    const l2Span = entriesPerTable * cs;

    const l1Offset = alloc.alloc(tableBytes, cs);
    const l1 = new Uint8Array(tableBytes);
    const l1v = new DataView(l1.buffer);
    const l2s = new Map<number, { offset: number; bytes: Uint8Array; view: DataView }>();
    const l2For = (l1Index: number) => {
      let t = l2s.get(l1Index);
      if (!t) {
        const bytes = new Uint8Array(tableBytes);
        t = { offset: alloc.alloc(tableBytes, cs), bytes, view: new DataView(bytes.buffer) };
        l2s.set(l1Index, t);
        l1v.setBigUint64(l1Index * 8, BigInt(t.offset), true);
      }
      return t;
    };
    let dataEnd = 0;
    for (const r of layout.runs) {
      if (r.kind === 'unallocated') continue;
      const zero = r.kind === 'zero';
      if (!zero) dataEnd = Math.max(dataEnd, r.host! + alignUp(r.length, cs));
      // Entry by entry within a run, one L2 table at a time; values as two u32 halves (no BigInt per entry).
      const end = r.guest + r.length;
      for (let g = r.guest; g < end; ) {
        const l1Index = Math.floor(g / l2Span);
        const t = l2For(l1Index);
        const stop = Math.min(end, (l1Index + 1) * l2Span);
        let at = (Math.floor(g / cs) % entriesPerTable) * 8;
        const value = zero ? QED_ZERO_CLUSTER : r.host! + (g - r.guest);
        // The halves carried along (no division per entry): lo steps by the cluster size, hi on overflow.
        let lo = value % 0x1_0000_0000;
        let hi = Math.floor(value / 0x1_0000_0000);
        const step = zero ? 0 : cs;
        const view = t.view;
        for (; g < stop; g += cs, at += 8) {
          view.setUint32(at, lo, true);
          view.setUint32(at + 4, hi, true);
          lo += step;
          if (lo >= 0x1_0000_0000) {
            lo -= 0x1_0000_0000;
            hi++;
          }
        }
      }
    }
    const header = new Uint8Array(headerBytes);
    let features = 0n;
    let nameOffset = 0;
    let nameSize = 0;
    if (backing) {
      features |= QED_F_BACKING_FILE;
      if (backing.format === 'raw') features |= QED_F_BACKING_FORMAT_NO_PROBE;
      const name = Buffer.from(backing.filename, 'utf8');
      nameOffset = QED_HEADER_BYTES;
      nameSize = name.length;
      header.set(name, nameOffset);
    }
    header.set(
      encodeHeader({
        magic: QED_MAGIC,
        clusterSize: cs,
        tableSize: ts,
        headerSize: headerClustersN,
        features,
        compatFeatures: 0n,
        autoclearFeatures: 0n,
        l1TableOffset: BigInt(l1Offset),
        imageSize: BigInt(input.info.virtualSize),
        backingFilenameOffset: nameOffset,
        backingFilenameSize: nameSize,
      }),
      0,
    );
    const writes: HostWrite[] = [{ offset: l1Offset, bytes: l1 }];
    for (const t of l2s.values()) writes.push({ offset: t.offset, bytes: t.bytes });
    // QEMU accepts a cluster only below the file size rounded down to a cluster: whole clusters.
    const finalLength = alignUp(Math.max(alloc.end, dataEnd, headerBytes), cs);
    return { writes, fixed: [{ offset: 0, bytes: header }], finalLength, metadataBytes: headerBytes + tableBytes * (1 + l2s.size) };
  },
};

function countL2(runs: { guest: number; length: number; kind: string }[], l2Span: number): number {
  const used = new Set<number>();
  for (const r of runs) {
    if (r.kind === 'unallocated') continue;
    for (let i = Math.floor(r.guest / l2Span); i <= Math.floor((r.guest + r.length - 1) / l2Span); i++) used.add(i);
  }
  return used.size;
}
