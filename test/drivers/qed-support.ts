/**
 * Builds small QED images in memory for tests that qemu-img cannot make (table_size 1, hostile
 * values): header in cluster 0, L1 from cluster 1, then L2 tables and data clusters in the order
 * the guest clusters are given.
 */
import { MemoryBlockDevice } from '../../src/blockdev/memory.js';
import { NoWriteDevice } from '../support/devices.js';
import { encodeHeader, type QedHeader } from '../../drivers/qed/header.js';
import { encodeTable } from '../../drivers/qed/tables.js';

export interface BuildOptions {
  clusterSize?: number;
  tableSize?: number;
  virtualSize?: number;
  /** Clusters of header area (the L1 table follows it). */
  headerSize?: number;
  /** Guest cluster index → a fill byte for a data cluster, or 'zero' for a zero cluster. */
  clusters?: Map<number, number | 'zero'>;
  header?: Partial<QedHeader>;
  backingName?: string;
}

export interface BuiltQed {
  bytes: Uint8Array;
  header: QedHeader;
  l1Offset: number;
  /** L1 index → L2 table offset. */
  l2Offsets: Map<number, number>;
  /** Guest cluster index → host offset of its data cluster. */
  dataOffsets: Map<number, number>;
}

export function buildQed(o: BuildOptions = {}): BuiltQed {
  const cs = o.clusterSize ?? 4096;
  const ts = o.tableSize ?? 1;
  const tableBytes = cs * ts;
  const entries = tableBytes / 8;
  const virtualSize = o.virtualSize ?? 16 * 1024 * 1024;
  const name = o.backingName ? Buffer.from(o.backingName) : undefined;
  const headerBytes = (o.headerSize ?? 1) * cs;
  const header: QedHeader = {
    magic: 'QED\0',
    clusterSize: cs,
    tableSize: ts,
    headerSize: o.headerSize ?? 1,
    features: name ? 1n : 0n,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: BigInt(headerBytes),
    imageSize: BigInt(virtualSize),
    backingFilenameOffset: name ? 64 : 0,
    backingFilenameSize: name ? name.length : 0,
    ...o.header,
  };
  let end = headerBytes + tableBytes;
  const l1: bigint[] = new Array(entries).fill(0n);
  const l2 = new Map<number, bigint[]>();
  const l2Offsets = new Map<number, number>();
  const dataOffsets = new Map<number, number>();
  const fills: { at: number; byte: number }[] = [];
  for (const [g, what] of o.clusters ?? new Map()) {
    const i = Math.floor(g / entries);
    let table = l2.get(i);
    if (!table) {
      table = new Array(entries).fill(0n);
      l2.set(i, table);
      l2Offsets.set(i, end);
      l1[i] = BigInt(end);
      end += tableBytes;
    }
    if (what === 'zero') table[g % entries] = 1n;
    else {
      table[g % entries] = BigInt(end);
      dataOffsets.set(g, end);
      fills.push({ at: end, byte: what });
      end += cs;
    }
  }
  const bytes = new Uint8Array(end);
  bytes.set(encodeHeader(header), 0);
  if (name) bytes.set(name, 64);
  bytes.set(encodeTable(l1, tableBytes), headerBytes);
  for (const [i, t] of l2) bytes.set(encodeTable(t, tableBytes), l2Offsets.get(i)!);
  for (const f of fills) bytes.fill(f.byte, f.at, f.at + cs);
  return { bytes, header, l1Offset: headerBytes, l2Offsets, dataOffsets };
}

export function setU64(bytes: Uint8Array, offset: number, v: bigint): void {
  new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).setBigUint64(offset, v, true);
}

export function readOnlyDevice(bytes: Uint8Array, path = '/mem/image.qed'): NoWriteDevice {
  return new NoWriteDevice(MemoryBlockDevice.from(bytes, path));
}
