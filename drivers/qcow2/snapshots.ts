/**
 * Internal snapshot table (qcow2.rst "Snapshots"; block/qcow2-snapshot.c qcow2_read_snapshots):
 * entries start on 8-byte boundaries; a 40-byte fixed part, extra data (v3: at least
 * vm_state_size_large and disk_size), then the id and name strings (not NUL-terminated).
 */
import { FieldReader, FieldWriter } from '../../src/binary.js';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import { FormatError } from '../../src/errors.js';
import { FORMAT, SNAPSHOT_HEADER_BYTES } from './header.js';

/** QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE (block/qcow2.h). */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_SNAPSHOTS_TABLE_BYTES = 1024 * 65536;

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** Raw extra data (vm_state_size_large, disk_size, icount, then unknown bytes). */
  extraData: Uint8Array;
}

/** The fixed part of one entry plus where its variable part ends. */
function decodeFixed(buf: Uint8Array): { fixed: Omit<Qcow2Snapshot, 'id' | 'name' | 'extraData'>; idSize: number; nameSize: number; extraSize: number } {
  const r = new FieldReader(buf, 'be', FORMAT);
  return {
    fixed: {
      l1TableOffset: r.u64(0, 'snapshot l1_table_offset'),
      l1Size: r.u32(8),
      dateSec: r.u32(16),
      dateNsec: r.u32(20),
      vmClockNsec: r.u64big(24),
      vmStateSize: r.u32(32),
    },
    idSize: r.u16(12),
    nameSize: r.u16(14),
    extraSize: r.u32(36),
  };
}

function checkExtra(extraSize: number, index: number): void {
  if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) {
    throw new FormatError(FORMAT, 'snapshot extra_data_size', extraSize, `entry ${index} has more than ${MAX_SNAPSHOT_EXTRA_DATA} bytes of extra data`);
  }
}

function assemble(
  fixed: Omit<Qcow2Snapshot, 'id' | 'name' | 'extraData'>,
  body: Uint8Array,
  extraSize: number,
  idSize: number,
): Qcow2Snapshot {
  const text = (a: number, b: number) => Buffer.from(body.subarray(a, b)).toString('utf8');
  return { ...fixed, extraData: body.slice(0, extraSize), id: text(extraSize, extraSize + idSize), name: text(extraSize + idSize, body.length) };
}

/** Decodes `count` entries from a buffer holding the whole table; returns them and the table's byte size. */
export function decodeSnapshotTable(buf: Uint8Array, count: number): { snapshots: Qcow2Snapshot[]; size: number } {
  const snapshots: Qcow2Snapshot[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    pos = Math.ceil(pos / 8) * 8;
    if (pos + SNAPSHOT_HEADER_BYTES > buf.length) throw new FormatError(FORMAT, 'snapshot table', pos, `entry ${i} runs past the table`);
    const { fixed, idSize, nameSize, extraSize } = decodeFixed(buf.subarray(pos, pos + SNAPSHOT_HEADER_BYTES));
    checkExtra(extraSize, i);
    pos += SNAPSHOT_HEADER_BYTES;
    const bodyLen = extraSize + idSize + nameSize;
    if (pos + bodyLen > buf.length) throw new FormatError(FORMAT, 'snapshot table', pos, `entry ${i} runs past the table`);
    snapshots.push(assemble(fixed, buf.subarray(pos, pos + bodyLen), extraSize, idSize));
    pos += bodyLen;
  }
  return { snapshots, size: pos };
}

export function encodeSnapshotTable(snaps: Qcow2Snapshot[]): Uint8Array {
  const parts: Uint8Array[] = [];
  let size = 0;
  for (const s of snaps) {
    const pad = Math.ceil(size / 8) * 8 - size;
    if (pad) {
      parts.push(new Uint8Array(pad));
      size += pad;
    }
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const e = new Uint8Array(SNAPSHOT_HEADER_BYTES + s.extraData.length + id.length + name.length);
    const w = new FieldWriter(e, 'be');
    w.u64(0, s.l1TableOffset);
    w.u32(8, s.l1Size);
    w.u16(12, id.length);
    w.u16(14, name.length);
    w.u32(16, s.dateSec);
    w.u32(20, s.dateNsec);
    w.u64(24, s.vmClockNsec);
    w.u32(32, s.vmStateSize);
    w.u32(36, s.extraData.length);
    w.bytes(40, s.extraData);
    w.bytes(40 + s.extraData.length, id);
    w.bytes(40 + s.extraData.length + id.length, name);
    parts.push(e);
    size += e.length;
  }
  const out = new Uint8Array(size);
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/**
 * Reads the table entry by entry (its size is known only once read), bounded by QEMU's 64 MiB table
 * limit and by the file.
 */
export async function readSnapshotTable(
  dev: BlockDevice,
  offset: number,
  count: number,
  fileSize: number,
): Promise<{ snapshots: Qcow2Snapshot[]; size: number }> {
  const snapshots: Qcow2Snapshot[] = [];
  let pos = offset;
  for (let i = 0; i < count; i++) {
    pos = Math.ceil(pos / 8) * 8;
    if (pos + SNAPSHOT_HEADER_BYTES > fileSize) throw new FormatError(FORMAT, 'snapshots_offset', offset, `snapshot entry ${i} runs past the end of the file`);
    const { fixed, idSize, nameSize, extraSize } = decodeFixed(await readAt(dev, pos, SNAPSHOT_HEADER_BYTES));
    checkExtra(extraSize, i);
    pos += SNAPSHOT_HEADER_BYTES;
    const bodyLen = extraSize + idSize + nameSize;
    if (pos + bodyLen > fileSize) throw new FormatError(FORMAT, 'snapshots_offset', offset, `snapshot entry ${i} runs past the end of the file`);
    if (pos + bodyLen - offset > MAX_SNAPSHOTS_TABLE_BYTES) {
      throw new FormatError(FORMAT, 'nb_snapshots', count, `snapshot table larger than QEMU's ${MAX_SNAPSHOTS_TABLE_BYTES} bytes`);
    }
    snapshots.push(assemble(fixed, await readAt(dev, pos, bodyLen), extraSize, idSize));
    pos += bodyLen;
  }
  return { snapshots, size: pos - offset };
}
