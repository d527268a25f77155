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
}

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
  /** Releases related devices this image opened (not `dev`). */
  close(): Promise<void>;
}

export interface FormatDriver {
  readonly name: string;
  readonly description: string;
  /**
   * 0 when the bytes are not this format; 100 for a valid magic and sane header; raw answers 1.
   * Must not throw: a failed probe is a 0.
   */
  probe(input: ProbeInput): number;
  open(dev: BlockDevice, ctx: OpenContext): Promise<SourceImage>;
}
