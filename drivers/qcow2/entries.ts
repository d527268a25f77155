/**
 * Table entries (qcow2.rst "Cluster mapping", "Compressed Clusters Descriptor", "Extended L2
 * Entries", "Host cluster management"). Entries are big-endian u64s handled as two u32 halves so the
 * hot loops stay in plain numbers; offsets are < 2^56 and exact below 2^53 (anything larger is past
 * every real end of file and is refused as such).
 */

const TWO32 = 2 ** 32;

/** Masks (block/qcow2.h), split into high and low 32-bit halves. */
const OFFSET_MASK_HI = 0x00ffffff; // L1E/L2E offset bits 32..55
const OFFSET_MASK_LO = 0xfffffe00; // bits 9..31
const L1_RESERVED_HI = 0x7f000000; // L1E_RESERVED_MASK 0x7f000000000001ff
const L1_RESERVED_LO = 0x1ff;
const L2_STD_RESERVED_HI = 0x3f000000; // L2E_STD_RESERVED_MASK 0x3f000000000001fe
const L2_STD_RESERVED_LO = 0x1fe;
const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;
const ZERO_LO = 1;

/** Bits 9..55: the host offset of an L1 entry, a standard L2 entry or a bitmap table entry. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_MASK_HI) * TWO32 + ((lo & OFFSET_MASK_LO) >>> 0);
}

export function isCopied(hi: number): boolean {
  return (hi & COPIED_HI) !== 0;
}

export function l1ReservedBits(hi: number, lo: number): boolean {
  return (hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0;
}

export function l2ReservedBits(hi: number, lo: number): boolean {
  return (hi & L2_STD_RESERVED_HI) !== 0 || (lo & L2_STD_RESERVED_LO) !== 0;
}

export function isZeroFlag(lo: number): boolean {
  return (lo & ZERO_LO) !== 0;
}

export interface L1Entry {
  l2Offset: number;
  copied: boolean;
  /** Reserved bits that are set (as a bigint mask); 0n when valid. */
  reserved: bigint;
}

export function decodeL1Entry(hi: number, lo: number): L1Entry {
  return {
    l2Offset: entryOffset(hi, lo),
    copied: isCopied(hi),
    reserved: (BigInt(hi & L1_RESERVED_HI) << 32n) | BigInt(lo & L1_RESERVED_LO),
  };
}

export function encodeL1Entry(e: L1Entry): [number, number] {
  const hi = ((e.copied ? COPIED_HI : 0) | Math.floor(e.l2Offset / TWO32) | Number(e.reserved >> 32n)) >>> 0;
  const lo = ((e.l2Offset % TWO32) | Number(e.reserved & 0xffffffffn)) >>> 0;
  return [hi, lo];
}

export interface StandardL2Entry {
  compressed: false;
  copied: boolean;
  /** Host cluster offset (0 = none). */
  offset: number;
  /** Bit 0: reads as zeros (v3; reserved with extended L2). */
  zero: boolean;
  reserved: bigint;
}

export interface CompressedL2Entry {
  compressed: true;
  copied: boolean;
  /** Byte offset of the compressed payload (any alignment). */
  hostOffset: number;
  /** Additional 512-byte sectors beyond the first. */
  extraSectors: number;
}

export type L2Entry = StandardL2Entry | CompressedL2Entry;

/** Bit position where the compressed descriptor's sector count starts: x = 62 - (cluster_bits - 8). */
export function csizeShift(clusterBits: number): number {
  return 62 - (clusterBits - 8);
}

export function isCompressedEntry(hi: number): boolean {
  return (hi & COMPRESSED_HI) !== 0;
}

/** The compressed descriptor's payload offset and extra-sector count (bit x = 62 - (cluster_bits - 8) splits them). */
export function compressedFields(hi: number, lo: number, clusterBits: number): { hostOffset: number; extraSectors: number } {
  const shiftHi = csizeShift(clusterBits) - 32;
  return {
    hostOffset: (hi & ((1 << shiftHi) - 1)) * TWO32 + (lo >>> 0),
    extraSectors: (hi >>> shiftHi) & ((1 << (clusterBits - 8)) - 1),
  };
}

export function decodeL2Entry(hi: number, lo: number, clusterBits: number): L2Entry {
  const copied = isCopied(hi);
  if (isCompressedEntry(hi)) return { compressed: true, copied, ...compressedFields(hi, lo, clusterBits) };
  return {
    compressed: false,
    copied,
    offset: entryOffset(hi, lo),
    zero: isZeroFlag(lo),
    reserved: (BigInt(hi & L2_STD_RESERVED_HI) << 32n) | BigInt(lo & L2_STD_RESERVED_LO),
  };
}

export function encodeL2Entry(e: L2Entry, clusterBits: number): [number, number] {
  const copied = e.copied ? COPIED_HI : 0;
  if (e.compressed) {
    const shiftHi = csizeShift(clusterBits) - 32;
    const hi = copied | COMPRESSED_HI | (e.extraSectors << shiftHi) | Math.floor(e.hostOffset / TWO32);
    return [hi >>> 0, (e.hostOffset % TWO32) >>> 0];
  }
  const hi = copied | Math.floor(e.offset / TWO32) | Number(e.reserved >> 32n);
  const lo = (e.offset % TWO32) | Number(e.reserved & 0xffffffffn) | (e.zero ? ZERO_LO : 0);
  return [hi >>> 0, lo >>> 0];
}

/**
 * Bytes QEMU reads for a compressed cluster (qcow2_parse_compressed_l2_entry): the sectors the
 * descriptor names, less the payload's offset into its first sector.
 */
export function compressedLength(e: { hostOffset: number; extraSectors: number }): number {
  return (e.extraSectors + 1) * 512 - (e.hostOffset % 512);
}

/** Extended L2 bitmap (second u64): low 32 bits "allocated", high 32 bits "reads as zeros", per subcluster. */
export interface SubclusterBitmap {
  alloc: number;
  zero: number;
}

export function decodeSubclusterBitmap(hi: number, lo: number): SubclusterBitmap {
  return { alloc: lo >>> 0, zero: hi >>> 0 };
}

export function encodeSubclusterBitmap(b: SubclusterBitmap): [number, number] {
  return [b.zero >>> 0, b.alloc >>> 0];
}

/** Refcount table entry: bits 9..63 refblock offset, bits 0..8 reserved. */
export interface ReftableEntry {
  offset: number;
  reserved: number;
}

export function decodeReftableEntry(hi: number, lo: number): ReftableEntry {
  return { offset: hi * TWO32 + ((lo & OFFSET_MASK_LO) >>> 0), reserved: lo & 0x1ff };
}

export function encodeReftableEntry(e: ReftableEntry): [number, number] {
  return [Math.floor(e.offset / TWO32) >>> 0, ((e.offset % TWO32) | e.reserved) >>> 0];
}

/** Reads entry `i` of a table of u64 (or u128 with `stride` 16) as its two halves. */
export function entryHalves(dv: DataView, byteOffset: number): [number, number] {
  return [dv.getUint32(byteOffset), dv.getUint32(byteOffset + 4)];
}

/**
 * One refcount of a refcount block with 2^order-bit entries. Sub-byte widths are packed from the
 * least significant bit of each byte (QEMU get_refcount_ro0..2); wider ones are big-endian.
 */
export function getRefcount(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> (2 * (index & 3))) & 3;
    case 2:
      return (block[index >>> 1]! >>> (4 * (index & 1))) & 0xf;
    case 3:
      return block[index]!;
    case 4:
      return (block[2 * index]! << 8) | block[2 * index + 1]!;
    case 5:
      return new DataView(block.buffer, block.byteOffset).getUint32(4 * index);
    default:
      return Number(new DataView(block.buffer, block.byteOffset).getBigUint64(8 * index));
  }
}

export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const per = 8 / bits;
      const byte = Math.floor(index / per);
      const shift = bits * (index % per);
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[2 * index] = value >>> 8;
      block[2 * index + 1] = value & 0xff;
      return;
    case 5:
      new DataView(block.buffer, block.byteOffset).setUint32(4 * index, value);
      return;
    default:
      new DataView(block.buffer, block.byteOffset).setBigUint64(8 * index, BigInt(value));
  }
}

/** Largest refcount an entry of this width holds (QEMU refcount_max). */
export function refcountMax(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}
