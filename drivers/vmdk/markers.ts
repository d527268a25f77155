/**
 * streamOptimized markers [LVM "Stream-optimized compressed sparse extent"; QEMU VmdkGrainMarker]:
 * - a grain marker (12 bytes: u64 LBA of the grain in sectors, u32 size of the compressed data)
 *   sits at the sector a GTE names, immediately followed by the zlib stream;
 * - a metadata marker is a whole sector: u64 value (sectors of the table that follows, 0 for EOS
 *   and footer), u32 size = 0, u32 type (0 end of stream, 1 grain table, 2 grain directory, 3 footer).
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import { FORMAT, SECTOR } from './header.js';

export const GRAIN_MARKER_BYTES = 12;
export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

export interface GrainMarker {
  /** Guest sector of the grain. */
  lba: bigint;
  /** Bytes of compressed data that follow. */
  size: number;
}

export function decodeGrainMarker(buf: Uint8Array): GrainMarker {
  const r = new FieldReader(buf, 'le', FORMAT);
  return { lba: r.u64big(0), size: r.u32(8) };
}

export function encodeGrainMarker(m: GrainMarker): Uint8Array {
  const buf = new Uint8Array(GRAIN_MARKER_BYTES);
  const w = new FieldWriter(buf, 'le');
  w.u64(0, m.lba);
  w.u32(8, m.size);
  return buf;
}

export interface MetadataMarker {
  /** Sectors of metadata following (GT/GD), 0 for EOS and footer markers. */
  numSectors: bigint;
  /** Always 0 for a metadata marker (a grain marker has its payload size here). */
  size: number;
  type: number;
}

export function decodeMetadataMarker(buf: Uint8Array): MetadataMarker {
  const r = new FieldReader(buf, 'le', FORMAT);
  return { numSectors: r.u64big(0), size: r.u32(8), type: r.u32(12) };
}

export function encodeMetadataMarker(m: MetadataMarker): Uint8Array {
  const buf = new Uint8Array(SECTOR);
  const w = new FieldWriter(buf, 'le');
  w.u64(0, m.numSectors);
  w.u32(8, m.size);
  w.u32(12, m.type);
  return buf;
}

/** Whether a sector is a metadata marker of `type` (size 0, padding zero). */
export function isMetadataMarker(buf: Uint8Array, type: number): boolean {
  if (buf.length < SECTOR) return false;
  const m = decodeMetadataMarker(buf);
  if (m.size !== 0 || m.type !== type) return false;
  for (let i = 16; i < SECTOR; i++) if (buf[i] !== 0) return false;
  return true;
}
