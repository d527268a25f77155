/**
 * VHD disk geometry and the virtual size rules.
 *
 * The footer stores both a CHS geometry and a byte size (current_size). Virtual PC sizes the disk by
 * the geometry, Hyper-V and most later tools by current_size; QEMU (block/vpc.c, vpc_open, 2.6–9.x)
 * picks by the creator application, and takes current_size anyway when the geometry is the maximum
 * 65535/16/255 (a size CHS cannot express). QEMU ≥ 10.0 inverted the list ("vpc " and "qemu" use CHS,
 * everything else current_size); the installed QEMU and this driver follow the older list.
 */

export const VHD_SECTOR = 512;
export const CHS_MAX_C = 65535;
export const CHS_MAX_H = 16;
export const CHS_MAX_S = 255;
/** 65535 · 16 · 255 sectors: the largest CHS geometry, ≈127.5 GiB. */
export const VHD_MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
/** QEMU's VHD_MAX_SECTORS: 0xff000000 sectors = 2040 GiB. */
export const VHD_MAX_SECTORS = 0xff000000;

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** Creator applications whose current_size QEMU trusts (vpc_open's table). */
export const CURRENT_SIZE_CREATORS: readonly string[] = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

export function geometrySectors(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

export function isMaxGeometry(g: Geometry): boolean {
  return geometrySectors(g) === VHD_MAX_GEOMETRY;
}

/**
 * The spec's CHS calculation (Virtual Hard Disk Image Format Specification, appendix "CHS
 * calculation"; QEMU's calculate_geometry), for a size in sectors. Rounds down: the geometry may
 * describe fewer sectors than asked. Sizes beyond the CHS range get the maximum geometry.
 */
export function geometryForSectors(totalSectors: number): Geometry {
  const total = Math.min(Math.max(0, Math.floor(totalSectors)), VHD_MAX_GEOMETRY);
  let sectorsPerTrack: number;
  let heads: number;
  let cylTimesHeads: number;
  if (total >= CHS_MAX_C * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylTimesHeads = Math.floor(total / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylTimesHeads = Math.floor(total / sectorsPerTrack);
    heads = Math.max(4, Math.ceil(cylTimesHeads / 1024));
    if (cylTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylTimesHeads = Math.floor(total / sectorsPerTrack);
    }
    if (cylTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylTimesHeads = Math.floor(total / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylTimesHeads / heads), heads, sectorsPerTrack };
}

/** geometryForSectors for a size in bytes (whole sectors only). */
export function geometryForSize(bytes: number): Geometry {
  return geometryForSectors(Math.floor(bytes / VHD_SECTOR));
}

export type SizeSource = 'chs' | 'current-size';

/**
 * Which size QEMU uses for a footer: current_size for the creators in its table and for the maximum
 * geometry, the CHS product otherwise.
 */
export function sizeSource(creatorApp: string, g: Geometry): SizeSource {
  return CURRENT_SIZE_CREATORS.includes(creatorApp) || isMaxGeometry(g) ? 'current-size' : 'chs';
}

/**
 * The virtual size in sectors exactly as QEMU's vpc_open computes it (before its 2040 GiB check):
 * C·H·S, or current_size / 512 rounded down. `currentSize` is a u64, hence bigint.
 */
export function virtualSectors(creatorApp: string, g: Geometry, currentSize: bigint): bigint {
  return sizeSource(creatorApp, g) === 'current-size' ? currentSize / 512n : BigInt(geometrySectors(g));
}

export interface CreateSize {
  /** The virtual size the image gets (bytes). */
  virtualSize: number;
  geometry: Geometry;
  /** "qemu" (CHS-sized) or "qem2" (force_size: current_size). */
  creatorApp: string;
}

/**
 * What `qemu-img create -f vpc -o size=N[,force_size=on]` makes (calculate_rounded_image_size):
 * the size is rounded up to a sector; without force_size it then grows to the smallest size whose
 * geometry covers it (QEMU rounds up, unlike the spec's calculation); force_size, or a size beyond
 * the CHS range, keeps the exact size with the maximum geometry. Sizes above 2040 GiB are refused.
 */
export function qemuCreateSize(requested: number, forceSize = false): CreateSize {
  const size = Math.ceil(requested / VHD_SECTOR) * VHD_SECTOR;
  const max: Geometry = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };
  let g: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) {
    g = max;
  } else {
    const want = Math.min(VHD_MAX_GEOMETRY, size / VHD_SECTOR);
    for (let i = 0; want > geometrySectors(g); i++) g = geometryForSectors(want + i);
  }
  let sectors: number;
  if (isMaxGeometry(g)) {
    sectors = size / VHD_SECTOR;
    if (sectors > VHD_MAX_SECTORS) throw new RangeError(`VHD size ${requested} is above 2040 GiB`);
  } else {
    sectors = geometrySectors(g);
  }
  return { virtualSize: sectors * VHD_SECTOR, geometry: g, creatorApp: forceSize ? 'qem2' : 'qemu' };
}
