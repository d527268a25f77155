/**
 * The VMDK text descriptor [LVM "Descriptor file"; QEMU vmdk_parse_extents / vmdk_read_cid]:
 *
 *   # Disk DescriptorFile
 *   version=1
 *   CID=fffffffe
 *   parentCID=ffffffff
 *   createType="monolithicSparse"
 *   parentFileNameHint="base.vmdk"        (delta disks only)
 *   RW 131072 SPARSE "disk.vmdk"          (extent lines: ACCESS SECTORS TYPE ["FILE" [OFFSET]])
 *   ddb.adapterType = "ide"               (disk database)
 *
 * It is either a whole small file (monolithicFlat, split and VMFS disks) or embedded in a sparse
 * extent, NUL-padded. Parsing is strict: a line that is none of comment, key = value or extent line
 * is a FormatError naming its number; sizes are bounded before anything is decoded.
 */
import { FormatError } from '../../src/errors.js';
import { FORMAT, MAX_DESCRIPTOR_BYTES } from './header.js';

export const NO_PARENT_CID = 0xffffffff;

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';

export interface DescriptorExtent {
  access: ExtentAccess;
  /** Size in sectors. */
  sectors: number;
  /** FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, VMFSRDM, VMFSRAW, SESPARSE. */
  type: string;
  /** Extent file name as written (absent for ZERO extents). */
  file?: string;
  /** Start sector inside the file (FLAT extents). */
  offset?: number;
}

export interface Descriptor {
  version: number;
  cid: number;
  parentCid: number;
  createType?: string;
  parentFileNameHint?: string;
  extents: DescriptorExtent[];
  /** ddb.* entries in file order, values unquoted. */
  ddb: [string, string][];
  /** Other top-level keys (encoding, isNativeSnapshot, ...), values as written after '='. */
  other: [string, string][];
}

const EXTENT_RE = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/;
const KEY_RE = /^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)$/;
const HEX_RE = /^[0-9a-fA-F]{1,8}$/;
// eslint-disable-next-line no-control-regex
const CONTROL_RE = /[\x00-\x08\x0b-\x1f\x7f]/;

function unquote(v: string): string {
  return v.length >= 2 && v.startsWith('"') && v.endsWith('"') ? v.slice(1, -1) : v;
}

/** Bytes up to the first NUL (an embedded descriptor is NUL-padded to its sectors). */
export function descriptorText(bytes: Uint8Array): string {
  if (bytes.length > MAX_DESCRIPTOR_BYTES) {
    throw new FormatError(FORMAT, 'descriptor', bytes.length, `larger than ${MAX_DESCRIPTOR_BYTES} bytes`);
  }
  const nul = bytes.indexOf(0);
  return Buffer.from(nul < 0 ? bytes : bytes.subarray(0, nul)).toString('utf8');
}

export interface DecodeOptions {
  /** Require createType (descriptor files; an embedded descriptor may omit it). Default true. */
  requireCreateType?: boolean;
}

export function decodeDescriptor(input: Uint8Array | string, opts: DecodeOptions = {}): Descriptor {
  const text = typeof input === 'string' ? input : descriptorText(input);
  if (text.length > MAX_DESCRIPTOR_BYTES) throw new FormatError(FORMAT, 'descriptor', text.length, `larger than ${MAX_DESCRIPTOR_BYTES} bytes`);
  let version: number | undefined;
  let cid: number | undefined;
  let parentCid: number | undefined;
  let createType: string | undefined;
  let parentFileNameHint: string | undefined;
  const extents: DescriptorExtent[] = [];
  const ddb: [string, string][] = [];
  const other: [string, string][] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i]!.replace(/\r$/, '');
    const line = raw.trim();
    const field = `descriptor line ${i + 1}`;
    if (line === '' || line.startsWith('#')) continue;
    if (CONTROL_RE.test(line)) throw new FormatError(FORMAT, field, line, 'contains control characters');
    const ext = EXTENT_RE.exec(line);
    if (ext) {
      const sectors = Number(ext[2]);
      if (!Number.isSafeInteger(sectors * 512)) throw new FormatError(FORMAT, field, line, 'extent size beyond 2^53 bytes');
      const e: DescriptorExtent = { access: ext[1] as ExtentAccess, sectors, type: ext[3]! };
      if (ext[4] !== undefined) e.file = ext[4];
      if (ext[5] !== undefined) {
        const offset = Number(ext[5]);
        if (!Number.isSafeInteger(offset * 512)) throw new FormatError(FORMAT, field, line, 'extent offset beyond 2^53 bytes');
        e.offset = offset;
      }
      extents.push(e);
      continue;
    }
    const kv = KEY_RE.exec(line);
    if (!kv) throw new FormatError(FORMAT, field, line, 'neither a comment, a key = value pair nor an extent line');
    const key = kv[1]!;
    const value = kv[2]!.trim();
    if (value.startsWith('"') && (value.length < 2 || !value.endsWith('"') || value.slice(1, -1).includes('"'))) {
      throw new FormatError(FORMAT, field, line, 'unbalanced quotes');
    }
    switch (key) {
      case 'version': {
        const v = unquote(value);
        if (!/^\d{1,3}$/.test(v)) throw new FormatError(FORMAT, field, line, 'version is not a small integer');
        version = Number(v);
        break;
      }
      case 'CID':
      case 'parentCID': {
        const v = unquote(value);
        if (!HEX_RE.test(v)) throw new FormatError(FORMAT, field, line, `${key} is not a 32-bit hexadecimal number`);
        if (key === 'CID') cid = parseInt(v, 16);
        else parentCid = parseInt(v, 16);
        break;
      }
      case 'createType':
        createType = unquote(value);
        break;
      case 'parentFileNameHint':
        parentFileNameHint = unquote(value);
        break;
      default:
        if (key.startsWith('ddb.')) ddb.push([key, unquote(value)]);
        else other.push([key, value]);
    }
  }
  if (version === undefined) throw new FormatError(FORMAT, 'descriptor version', null, 'missing "version=" line');
  if (cid === undefined) throw new FormatError(FORMAT, 'descriptor CID', null, 'missing "CID=" line (QEMU cannot open it either)');
  if (parentCid === undefined) throw new FormatError(FORMAT, 'descriptor parentCID', null, 'missing "parentCID=" line (QEMU cannot open it either)');
  if ((opts.requireCreateType ?? true) && createType === undefined) {
    throw new FormatError(FORMAT, 'descriptor createType', null, 'missing "createType=" line');
  }
  const d: Descriptor = { version, cid, parentCid, extents, ddb, other };
  if (createType !== undefined) d.createType = createType;
  if (parentFileNameHint !== undefined) d.parentFileNameHint = parentFileNameHint;
  return d;
}

/** Writes the descriptor in the layout QEMU and VMware use. */
export function encodeDescriptor(d: Descriptor): string {
  const out: string[] = ['# Disk DescriptorFile', `version=${d.version}`];
  for (const [k, v] of d.other) out.push(`${k}=${v}`);
  out.push(`CID=${(d.cid >>> 0).toString(16).padStart(8, '0')}`);
  out.push(`parentCID=${(d.parentCid >>> 0).toString(16).padStart(8, '0')}`);
  if (d.createType !== undefined) out.push(`createType="${d.createType}"`);
  if (d.parentFileNameHint !== undefined) out.push(`parentFileNameHint="${d.parentFileNameHint}"`);
  out.push('', '# Extent description');
  for (const e of d.extents) {
    let line = `${e.access} ${e.sectors} ${e.type}`;
    if (e.file !== undefined) {
      line += ` "${e.file}"`;
      if (e.offset !== undefined) line += ` ${e.offset}`;
    }
    out.push(line);
  }
  out.push('', '# The Disk Data Base', '#DDB', '');
  for (const [k, v] of d.ddb) out.push(`${k} = "${v}"`);
  return out.join('\n') + '\n';
}

export function ddbValue(d: Descriptor | undefined, key: string): string | undefined {
  return d?.ddb.find(([k]) => k === key)?.[1];
}

/** Whether text looks like a descriptor file: for probing, so it must not throw. */
export function looksLikeDescriptor(head: Uint8Array): boolean {
  const first = head.subarray(0, Math.min(head.length, 1024));
  for (const b of first) {
    if (b === 0) break;
    if (b < 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d) return false;
  }
  const text = Buffer.from(first).toString('latin1');
  if (!text.startsWith('# Disk DescriptorFile') && !/^\s*createType\s*=/m.test(text) && !/^version=[123]\r?\n/m.test(text)) return false;
  try {
    decodeDescriptor(head.length > MAX_DESCRIPTOR_BYTES ? head.subarray(0, MAX_DESCRIPTOR_BYTES) : head);
    return true;
  } catch {
    return false;
  }
}

/**
 * The disk's identity as the descriptor's disk database states it (ddb.uuid.image, ddb.adapterType,
 * ddb.geometry.*), for conversions to carry over.
 */
export function carriedFromDescriptor(d: Descriptor | undefined): Partial<Record<'uuid' | 'adapterType' | 'geometry', string>> {
  const out: Partial<Record<'uuid' | 'adapterType' | 'geometry', string>> = {};
  const uuid = vmdkUuidToCanonical(ddbValue(d, 'ddb.uuid.image'));
  if (uuid) out.uuid = uuid;
  const adapter = ddbValue(d, 'ddb.adapterType');
  if (adapter) out.adapterType = adapter;
  const g = [ddbValue(d, 'ddb.geometry.cylinders'), ddbValue(d, 'ddb.geometry.heads'), ddbValue(d, 'ddb.geometry.sectors')];
  if (g.every((x) => x !== undefined && /^\d+$/.test(x))) out.geometry = g.join('/');
  return out;
}

/**
 * VMware writes a UUID as 16 hex bytes separated by spaces, with a dash after the eighth
 * ("60 00 C2 9b 3c 1b 27 5e-a3 52 4e 9f 40 2f 3a c5"). Undefined when the text is not that (or is all zero).
 */
export function vmdkUuidToCanonical(text: string | undefined): string | undefined {
  if (text === undefined) return undefined;
  const hex = text.replace(/[\s-]/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex) || /^0+$/.test(hex)) return undefined;
  const h = hex.toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function canonicalToVmdkUuid(uuid: string): string {
  const bytes = uuid.replace(/-/g, '').toLowerCase().match(/../g)!;
  return `${bytes.slice(0, 8).join(' ')}-${bytes.slice(8).join(' ')}`;
}
