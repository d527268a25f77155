/**
 * The driver interface. One format per folder under drivers/, each implementing FormatDriver; the
 * core only ever sees this interface (the registry in drivers/index.ts is the one place that lists
 * them). Modelled on QEMU's BlockDriver tables: a probe, an open, and per-image operations.
 *
 * Read half (here): probe, open read-only with every field validated, extract the guest→host
 * mapping (ExtentMap) and the host-space map (HostSpace), report features, check structure.
 * Write half (the conversion engine's issue): lay out metadata for a given mapping in given free
 * space, and encode it; see DESIGN.md.
 */
import type { BlockDevice, OpenOptions } from './blockdev/types.js';
import type { Extent, ExtentMap } from './extent-map.js';
import type { HostSpace } from './host-space.js';
import type { StreamTarget } from './stream/types.js';

/** What probing sees: the first bytes, the last 512 bytes, and the size. */
export interface ProbeInput {
  head: Uint8Array;
  tail: Uint8Array;
  size: number;
  path: string;
}

export interface OpenContext {
  /** Path of the image, to resolve relative names (backing files, extents, data files). */
  path: string;
  /** Opens a file named by the image, relative to the image's directory. Read-only. */
  openRelated(name: string, opts?: OpenOptions): Promise<BlockDevice>;
}

export interface BackingRef {
  /** The name as stored in the image. */
  filename: string;
  /** Format as stored (qcow2 backing-format extension, QED NO_PROBE → raw, VMDK → vmdk), if any. */
  format?: string;
}

export interface ImageInfo {
  format: string;
  /** VMDK createType, VHD fixed/dynamic/differencing, qcow2 "v2"/"v3". */
  subformat?: string;
  virtualSize: number;
  /** Allocation unit: qcow2/QED cluster, VMDK grain, VHD block. */
  clusterSize?: number;
  backing?: BackingRef;
  /** qcow2 dirty bit, QED NEED_CHECK, VMDK uncleanShutdown. */
  dirty: boolean;
  /** qcow2 corrupt bit. */
  corrupt: boolean;
  /** Features in use, in words ("zero clusters", "compressed clusters", "2 internal snapshots"). */
  features: string[];
  /** Format-specific fields, for `info --output json`. */
  details: Record<string, string | number | boolean | null>;
  /**
   * Features whose content lives outside the guest mapping, so converting to another format cannot
   * carry them: 'refuse' when dropping them would lose user data (internal snapshots, encryption),
   * 'drop' when losing them is harmless and is only reported (dirty bitmaps, feature-name tables).
   */
  notCarried?: { feature: string; action: 'refuse' | 'drop'; detail: string }[];
  /**
   * Identity of the disk that a target may carry over (TargetPlan.kept says which it did; the engine
   * lists the others as dropped): the disk UUID (canonical 8-4-4-4-12 hex), the controller type, the
   * CHS geometry ("C/H/S"), the application that created it.
   */
  carried?: Partial<Record<CarriedField, string>>;
}

export type CarriedField = 'uuid' | 'adapterType' | 'geometry' | 'creator';
export const CARRIED_LABELS: Record<CarriedField, string> = { uuid: 'disk UUID', adapterType: 'adapter type', geometry: 'geometry', creator: 'creator application' };

/** The result of a structural check, shaped like `qemu-img check --output=json`. */
export interface CheckReport {
  format: string;
  /** Structural errors that make data unsafe. */
  corruptions: number;
  /** Space in use that nothing references (harmless). */
  leaks: number;
  /** Errors that stopped the check. */
  checkErrors: number;
  /** One line per problem found. */
  messages: string[];
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
}

export interface SourceImage {
  readonly format: string;
  readonly info: ImageInfo;
  /** The image file itself (for VMDK flat, the descriptor). */
  readonly dev: BlockDevice;
  /** Where `data` extents' host offsets point: `dev`, or an external data file / flat extent. */
  readonly dataDev: BlockDevice;
  /** Name of dataDev for `map` output when it is not the image file. */
  readonly dataFile?: string;
  mapping(): Promise<ExtentMap>;
  hostSpace(): Promise<HostSpace>;
  check(): Promise<CheckReport>;
  /** The decompressed bytes of one compressed extent (its whole cluster/grain). */
  readCompressed?(extent: Extent): Promise<Uint8Array>;
  /**
   * The structures that can be moved, with where the one pointer to each lives: for compaction after
   * a conversion (and relocation before one). `level` 0 is data, higher levels are tables whose
   * pointers live in the level above (QED: data ← L2 entry, L2 ← L1 entry, L1 ← header field).
   * Only structures of `level` that end above `minHost` are listed.
   */
  relocatable?(level: number, minHost: number): Promise<Relocatable[]>;
  /** Host alignment a relocated data unit needs (QED: the cluster size; VMDK: a sector). */
  readonly relocationAlignment?: number;
  /** Releases related devices this image opened (not `dev`). */
  close(): Promise<void>;
}

export interface Relocatable {
  host: number;
  length: number;
  level: number;
  /** Level 0: the guest offset of the data unit. */
  guest?: number;
  /**
   * Where the pointer to this structure is stored, and its bytes when the structure is at `newHost`.
   * `mirror`: a redundant copy of the pointer (VMDK's redundant grain tables), written with the same bytes.
   */
  pointer: { offset: number; encode(newHost: number): Uint8Array; mirror?: number };
}

export interface FormatDriver {
  readonly name: string;
  /**
   * The name QEMU gives the format where it differs ('vpc' for vhd): accepted wherever a format is named
   * (-f, backing-format fields), and written into new images' backing-format fields, which QEMU reads.
   */
  readonly qemuName?: string;
  readonly description: string;
  /**
   * 0 when the bytes are not this format; 100 for a valid magic and sane header; raw answers 1.
   * Must not throw: a failed probe is a 0.
   */
  probe(input: ProbeInput): number;
  open(dev: BlockDevice, ctx: OpenContext): Promise<SourceImage>;
  /** Present when the format can be a conversion target. */
  readonly target?: TargetDriver;
  /** Present when the format can be written to (and read from) a pipe: `imgconv stream` / `unstream`. */
  readonly stream?: StreamTarget;
}

// ---------------------------------------------------------------------------------------------------
// Write half: what a target format provides to the conversion engine (src/engine/convert.ts).

/** `-o key=value,...` as given by the user (qemu-img's option names where they exist). */
export type TargetOptions = Record<string, string>;

/** Bytes at a host offset. */
export interface HostWrite {
  offset: number;
  bytes: Uint8Array;
}

export interface PlanInput {
  /** The image's path (names written into the new metadata: VMDK extent lines). */
  path?: string;
  /**
   * The backing file as its own driver opened it, when it could be opened (a VMDK delta records its
   * parent's CID). Absent without a backing file, or when it is missing: targets that need it refuse.
   */
  backingInfo?: ImageInfo;
  /** The source's top layer. */
  info: ImageInfo;
  mapping: ExtentMap;
  hostSpace: HostSpace;
  fileSize: number;
  options: TargetOptions;
}

export interface TargetPlan {
  format: string;
  /** Chosen parameters, for `plan` output ("cluster_size": 65536, "compat": "1.1", ...). */
  parameters: Record<string, string | number | boolean>;
  /** Fixed-offset regions the new format's header/footer occupy; written only at the commit point. */
  fixedRegions: { start: number; length: number; what: string }[];
  /**
   * Guest ranges the target cannot express where their data lies now (misaligned data, data under a
   * fixed region, compressed data). The engine relocates these before building, or refuses.
   */
  mustMove: {
    guest: number;
    length: number;
    reason: string;
    /**
     * Host bytes the moved range takes after the prefix, when more than `length` (VHD dynamic: a
     * partial last block still takes a whole block on the host). Only `length` bytes are copied.
     */
    hostLength?: number;
  }[];
  /** Alignment a data run's host offset needs in this target (cluster size; 512 when sector-addressed). */
  dataAlignment: number;
  /**
   * Bytes the target needs right in front of each moved range (VHD dynamic: the block's sector bitmap).
   * The engine allocates prefix + range and places the data after the prefix; `build` may then use the
   * prefix, which no other structure is given.
   */
  movePrefix?: number;
  /**
   * Host ranges outside the fixed regions that `build` will use where they are (VHD dynamic: the bitmap
   * sector in front of a block that stays). They must be free in the source; the allocator never hands
   * them out. Written before the commit point like any table.
   */
  reserved?: { start: number; length: number }[];
  /**
   * 'identity': the target can only express data at host offset = guest offset (raw, VHD fixed). The
   * engine relocates the source's data there before building (src/engine/relocate.ts), or refuses.
   */
  placement?: 'identity';
  /**
   * A file the conversion creates beside the image (relative to its directory): VMDK monolithicFlat's
   * descriptor, whose extent is the image file itself, now raw. The image is then the companion's data.
   */
  companion?: string;
  /** Source features that do not survive (listed in the output), e.g. "dirty bitmaps". */
  dropped: string[];
  /** Which of the source's `info.carried` fields the new image keeps; the engine lists the rest as dropped. */
  kept?: CarriedField[];
  /** Estimated bytes of new metadata (exact after build). */
  metadataBytes: number;
}

/** Hands out host space for new structures: free gaps of the source first, then past the end. */
export interface Allocator {
  alloc(length: number, align: number): number;
  /** The end of everything allocated so far and of the live source structures. */
  readonly end: number;
}

export interface TargetBuild {
  /** New structures in allocated space: written (and flushed) before the commit point. */
  writes: HostWrite[];
  /** The fixed regions' new bytes: journalled, then written in place at the commit point. */
  fixed: HostWrite[];
  /** File length once committed (≥ the end of every structure; e.g. whole clusters for QED). */
  finalLength: number;
  metadataBytes: number;
  /** The companion file's bytes (TargetPlan.companion), written at the commit point. */
  companion?: Uint8Array;
}

export interface TargetDriver {
  /**
   * True when the format's checker counts every unreferenced cluster inside the file as leaked (QED
   * has no refcounts): then reclaim compacts the file instead of only punching holes.
   */
  readonly unreferencedIsLeak?: boolean;
  /**
   * Whether zero runs over file holes reach plan/build as data in place (src/engine/holes.ts; the
   * default). False for targets that cannot keep such data where it lies anyway (VHD dynamic, whose
   * blocks need a free sector in front): mapped as data, every hole of a sparse raw disk would be
   * copied as zeros; as zeros, it stays an unallocated block.
   */
  holesAsData?(options: TargetOptions): boolean;
  /** Chooses parameters for this mapping; throws UnsupportedError/UsageError to refuse. Pure. */
  plan(input: PlanInput): TargetPlan;
  /** Lays out and encodes the new metadata for `mapping` (where data now lies). Pure but for `alloc`. */
  build(plan: TargetPlan, input: PlanInput, alloc: Allocator): TargetBuild;
}
