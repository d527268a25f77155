/**
 * VMDK (VMware virtual disk), read side: hosted sparse extents (monolithicSparse, streamOptimized)
 * and single-extent flat descriptor files (monolithicFlat). See sparse.ts and flat.ts; on-disk
 * structures in header.ts, markers.ts, descriptor.ts; the table walk in tables.ts.
 */
import { readAt } from '../../src/blockdev/types.js';
import type { FormatDriver, ProbeInput } from '../../src/driver.js';
import { FormatError, UnsupportedError } from '../../src/errors.js';
import { decodeDescriptor, looksLikeDescriptor } from './descriptor.js';
import { decodeSparseHeader, FORMAT, MAX_DESCRIPTOR_BYTES, MAX_GRAIN_SECTORS, MAX_GTES_PER_GT, VMDK3_MAGIC, VMDK4_MAGIC } from './header.js';
import { openDescriptorFile } from './flat.js';
import { openSparse } from './sparse.js';
import { vmdkTarget } from './target.js';
import { vmdkStream } from './stream.js';

export { decodeDescriptor, encodeDescriptor } from './descriptor.js';
export { decodeSparseHeader, encodeSparseHeader } from './header.js';

function u32le(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off, true);
}

/**
 * 100 for "KDMV" with version 1–3 and sane grain fields, or for a parseable text descriptor.
 * A raw disk is never taken: both need more than a magic.
 */
export function probeVmdk(input: ProbeInput): number {
  const { head } = input;
  if (head.length >= 4 && u32le(head, 0) === VMDK3_MAGIC) return 100; // refused at open with a clear message
  if (head.length >= 79 && u32le(head, 0) === VMDK4_MAGIC) {
    const h = decodeSparseHeader(head);
    if (h.version < 1 || h.version > 3) return 0;
    const grain = h.grainSize;
    if (grain === 0n || grain > BigInt(MAX_GRAIN_SECTORS) || (grain & (grain - 1n)) !== 0n) return 0;
    if (h.numGTEsPerGT === 0 || h.numGTEsPerGT > MAX_GTES_PER_GT) return 0;
    return 100;
  }
  if (input.size <= MAX_DESCRIPTOR_BYTES && looksLikeDescriptor(head)) return 100;
  return 0;
}

export const vmdkDriver: FormatDriver = {
  name: FORMAT,
  description: 'VMware VMDK: read monolithicSparse, streamOptimized, monolithicFlat; write monolithicSparse',
  target: vmdkTarget,
  stream: vmdkStream,
  probe(input) {
    try {
      return probeVmdk(input);
    } catch {
      return 0;
    }
  },
  async open(dev, ctx) {
    const size = await dev.size();
    const head = await readAt(dev, 0, Math.min(size, 4));
    const magic = size >= 4 ? u32le(head, 0) : 0;
    if (magic === VMDK4_MAGIC) return openSparse(dev, ctx, size);
    if (magic === VMDK3_MAGIC) {
      throw new UnsupportedError(FORMAT, 'VMDK3 (COWD) sparse extent', 'a legacy vmfsSparse extent; convert it first with `qemu-img convert -O vmdk`');
    }
    if (size > MAX_DESCRIPTOR_BYTES) {
      throw new FormatError(FORMAT, 'magic', magic, `neither "KDMV" nor a text descriptor (a descriptor file is far smaller than ${size} bytes)`);
    }
    const d = decodeDescriptor(await readAt(dev, 0, size));
    return openDescriptorFile(dev, ctx, d, size);
  },
};
