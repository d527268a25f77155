/**
 * Builds small VMDK sparse images in memory for hostile-input and layout tests: monolithicSparse
 * (QEMU's layout), streamOptimized with QEMU's layout, and streamOptimized as VMware streams it
 * (GD_AT_END: grains first, then GT/GD behind markers, footer, end-of-stream marker).
 */
import { deflateSync } from 'node:zlib';
import { encodeDescriptor, type Descriptor } from '../../drivers/vmdk/descriptor.js';
import {
  COMPRESSION_DEFLATE,
  encodeSparseHeader,
  FLAG_COMPRESS,
  FLAG_MARKER,
  FLAG_NL_DETECT,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  GD_AT_END,
  VMDK4_MAGIC,
  type SparseExtentHeader,
} from '../../drivers/vmdk/header.js';
import { encodeGrainMarker, encodeMetadataMarker, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT } from '../../drivers/vmdk/markers.js';

export interface BuildOpts {
  capacitySectors: number;
  grainSectors?: number;
  gtes?: number;
  zeroedGrain?: boolean;
  rgd?: boolean;
  /** Grain index → its bytes (padded to a grain) or 'zero' (GTE 1). */
  grains?: Map<number, Uint8Array | 'zero'>;
  stream?: boolean;
  gdAtEnd?: boolean;
  descriptor?: Partial<Descriptor>;
  uncleanShutdown?: boolean;
}

export interface Built {
  bytes: Uint8Array;
  header: SparseExtentHeader;
  gdOffset: number;
  rgdOffset?: number;
  gtOffsets: number[];
  /** Grain index → byte offset of the grain (or of its marker). */
  grainOffsets: Map<number, number>;
  footerAt?: number;
}

const S = 512;
const up = (n: number, a: number) => Math.ceil(n / a) * a;

export function buildSparse(o: BuildOpts): Built {
  const grainSectors = o.grainSectors ?? 8;
  const gtes = o.gtes ?? 512;
  const grainBytes = grainSectors * S;
  const gdEntries = Math.ceil(o.capacitySectors / (grainSectors * gtes));
  const gtSectors = Math.ceil((gtes * 4) / S);
  const gdSectors = Math.max(1, Math.ceil((gdEntries * 4) / S));
  const descSectors = 20;
  const d: Descriptor = {
    version: 1,
    cid: 0x12345678,
    parentCid: 0xffffffff,
    createType: o.stream ? 'streamOptimized' : 'monolithicSparse',
    extents: [{ access: 'RW', sectors: o.capacitySectors, type: 'SPARSE', file: 'x.vmdk' }],
    ddb: [['ddb.adapterType', 'ide'], ['ddb.virtualHWVersion', '4']],
    other: [],
    ...o.descriptor,
  };
  const descBytes = Buffer.from(encodeDescriptor(d), 'utf8');
  if (descBytes.length > descSectors * S) throw new Error('descriptor too long for the builder');

  const chunks: { at: number; bytes: Uint8Array }[] = [];
  const put = (at: number, bytes: Uint8Array) => chunks.push({ at, bytes });
  put(S, descBytes);

  const gts: Uint32Array[] = Array.from({ length: gdEntries }, () => new Uint32Array(gtes));
  const grainOffsets = new Map<number, number>();
  const flags = FLAG_NL_DETECT | (o.zeroedGrain ? FLAG_ZERO_GRAIN : 0) | (o.stream ? FLAG_COMPRESS | FLAG_MARKER : 0) | (o.rgd ? FLAG_RGD : 0);
  const header: SparseExtentHeader = {
    magic: VMDK4_MAGIC,
    version: o.stream ? 3 : o.zeroedGrain ? 2 : 1,
    flags,
    capacity: BigInt(o.capacitySectors),
    grainSize: BigInt(grainSectors),
    descriptorOffset: 1n,
    descriptorSize: BigInt(descSectors),
    numGTEsPerGT: gtes,
    rgdOffset: 0n,
    gdOffset: 0n,
    overHead: 0n,
    uncleanShutdown: o.uncleanShutdown ? 1 : 0,
    singleEndLineChar: 0x0a,
    nonEndLineChar: 0x20,
    doubleEndLineChar1: 0x0d,
    doubleEndLineChar2: 0x0a,
    compressAlgorithm: o.stream ? COMPRESSION_DEFLATE : 0,
  };
  const grainEntries = [...(o.grains ?? new Map()).entries()].sort((a, b) => a[0] - b[0]);
  const setGte = (idx: number, v: number) => {
    gts[Math.floor(idx / gtes)]![idx % gtes] = v;
  };
  const encodeGrain = (idx: number, data: Uint8Array): Uint8Array => {
    const full = new Uint8Array(grainBytes);
    full.set(data.subarray(0, grainBytes));
    const guestBytes = Math.min(grainBytes, o.capacitySectors * S - idx * grainBytes);
    const z = deflateSync(full.subarray(0, guestBytes));
    const out = new Uint8Array(up(12 + z.length, S));
    out.set(encodeGrainMarker({ lba: BigInt(idx * grainSectors), size: z.length }));
    out.set(z, 12);
    return out;
  };

  let sector = 1 + descSectors;
  let gdOffset: number;
  let rgdOffset: number | undefined;
  const gtOffsets: number[] = [];
  let footerAt: number | undefined;
  let end: number;

  if (!o.gdAtEnd) {
    const tables = (redundant: boolean) => {
      const gdAt = sector;
      sector += gdSectors;
      const gtAts: number[] = [];
      for (let i = 0; i < gdEntries; i++) {
        gtAts.push(sector);
        sector += gtSectors;
      }
      return { gdAt, gtAts, redundant };
    };
    const r = o.rgd ? tables(true) : undefined;
    const m = tables(false);
    const overHead = up(sector, grainSectors);
    sector = overHead;
    for (const [idx, v] of grainEntries) {
      if (v === 'zero') {
        setGte(idx, 1);
        continue;
      }
      grainOffsets.set(idx, sector * S);
      setGte(idx, sector);
      if (o.stream) {
        const g = encodeGrain(idx, v);
        put(sector * S, g);
        sector += g.length / S;
      } else {
        const full = new Uint8Array(grainBytes);
        full.set(v.subarray(0, grainBytes));
        put(sector * S, full);
        sector += grainSectors;
      }
    }
    for (const t of r ? [r, m] : [m]) {
      const gd = new Uint8Array(gdSectors * S);
      const dv = new DataView(gd.buffer);
      t.gtAts.forEach((gtAt, i) => dv.setUint32(i * 4, gtAt, true));
      put(t.gdAt * S, gd);
      t.gtAts.forEach((gtAt, i) => put(gtAt * S, new Uint8Array(gts[i]!.buffer.slice(0))));
    }
    gdOffset = m.gdAt * S;
    gtOffsets.push(...m.gtAts.map((x) => x * S));
    if (r) rgdOffset = r.gdAt * S;
    header.gdOffset = BigInt(m.gdAt);
    header.rgdOffset = r ? BigInt(r.gdAt) : 0n;
    header.overHead = BigInt(overHead);
    end = up(sector * S, S);
    if (o.stream) {
      put(end, encodeMetadataMarker({ numSectors: 0n, size: 0, type: MARKER_EOS }));
      end += S;
    }
  } else {
    // VMware stream: header (GD_AT_END), descriptor, grains, [GT marker, GT]*, GD marker, GD, footer, EOS.
    header.overHead = BigInt(sector);
    for (const [idx, v] of grainEntries) {
      if (v === 'zero') {
        setGte(idx, 1);
        continue;
      }
      const g = encodeGrain(idx, v);
      grainOffsets.set(idx, sector * S);
      setGte(idx, sector);
      put(sector * S, g);
      sector += g.length / S;
    }
    const gd = new Uint8Array(gdSectors * S);
    const gdv = new DataView(gd.buffer);
    for (let i = 0; i < gdEntries; i++) {
      if (gts[i]!.every((x) => x === 0)) continue; // VMware omits empty GTs
      put(sector * S, encodeMetadataMarker({ numSectors: BigInt(gtSectors), size: 0, type: MARKER_GT }));
      sector++;
      put(sector * S, new Uint8Array(gts[i]!.buffer.slice(0)));
      gdv.setUint32(i * 4, sector, true);
      gtOffsets.push(sector * S);
      sector += gtSectors;
    }
    put(sector * S, encodeMetadataMarker({ numSectors: BigInt(gdSectors), size: 0, type: MARKER_GD }));
    sector++;
    put(sector * S, gd);
    gdOffset = sector * S;
    const footerHeader = { ...header, gdOffset: BigInt(sector) };
    sector += gdSectors;
    footerAt = sector * S;
    put(sector * S, encodeMetadataMarker({ numSectors: 0n, size: 0, type: MARKER_FOOTER }));
    put((sector + 1) * S, encodeSparseHeader(footerHeader));
    put((sector + 2) * S, encodeMetadataMarker({ numSectors: 0n, size: 0, type: MARKER_EOS }));
    end = (sector + 3) * S;
    header.gdOffset = GD_AT_END;
  }
  put(0, encodeSparseHeader(header));
  const bytes = new Uint8Array(end);
  for (const c of chunks) bytes.set(c.bytes, c.at);
  return { bytes, header, gdOffset, ...(rgdOffset !== undefined ? { rgdOffset } : {}), gtOffsets, grainOffsets, ...(footerAt !== undefined ? { footerAt } : {}) };
}

export function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}
