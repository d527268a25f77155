/**
 * An open VHD: its mapping, host space and check.
 */
import { MAX_SAFE } from '../../src/binary.js';
import { readExact, type BlockDevice } from '../../src/blockdev/types.js';
import type { BackingRef, CheckReport, ImageInfo, SourceImage } from '../../src/driver.js';
import { FormatError } from '../../src/errors.js';
import { ExtentMap } from '../../src/extent-map.js';
import { HostSpace } from '../../src/host-space.js';
import {
  BAT_UNUSED,
  DYN_CHECKSUM_OFFSET,
  FEATURE_RESERVED,
  FEATURE_TEMPORARY,
  FOOTER_SIZE,
  FORMAT,
  VHD_VERSION,
  bitmapTest,
  footerChecksumOk,
  formatUuid,
  printable,
  vhdChecksum,
  vhdTimestampIso,
} from './format.js';
import { Findings } from './findings.js';
import { VHD_SECTOR, sizeSource } from './geometry.js';
import { analyseLayout, type Layout } from './layout.js';
import type { DynamicState, LocatedFooter, Subformat } from './open.js';

function u64Detail(v: bigint): number | string {
  return v <= BigInt(MAX_SAFE) ? Number(v) : v.toString();
}

export class VhdImage implements SourceImage {
  readonly format = FORMAT;
  readonly dataDev: BlockDevice;
  private layoutCache: Layout | undefined;
  private mapCache: ExtentMap | undefined;

  constructor(
    readonly dev: BlockDevice,
    readonly info: ImageInfo,
    private readonly fileSize: number,
    private readonly subformat: Subformat,
    private readonly lf: LocatedFooter,
    private readonly dyn: DynamicState | undefined,
  ) {
    this.dataDev = dev;
  }

  private get virtualSize(): number {
    return this.info.virtualSize;
  }

  /** Dynamic/differencing only: where everything lies, computed once from the BAT. */
  private layout(): Layout {
    return (this.layoutCache ??= analyseLayout(this.dyn!, this.fileSize));
  }

  async mapping(): Promise<ExtentMap> {
    if (this.mapCache) return this.mapCache;
    const map = new ExtentMap(this.virtualSize);
    const d = this.dyn;
    if (!d) {
      // Fixed: guest byte x is file byte x. QEMU reports the whole disk as data (block status
      // DATA|RECURSE); holes in the file then show as zero:true data:true in qemu-img map.
      map.push({ guest: 0, length: this.virtualSize, kind: 'data', host: 0 });
      return (this.mapCache = map);
    }
    const fatal = this.layout().problems.firstFatal();
    if (fatal) throw new FormatError(FORMAT, fatal.field, fatal.value, fatal.message);
    const diff = this.subformat === 'differencing';
    const blocks = Math.ceil(this.virtualSize / d.blockSize);
    for (let k = 0; k < blocks; k++) {
      const guest = k * d.blockSize;
      const length = Math.min(d.blockSize, this.virtualSize - guest);
      const entry = d.bat[k]!;
      if (entry === BAT_UNUSED) {
        map.push({ guest, length, kind: diff ? 'unallocated' : 'zero' });
        continue;
      }
      const host = entry * VHD_SECTOR + d.bitmapSize;
      if (!diff) {
        map.push({ guest, length, kind: 'data', host });
        continue;
      }
      const bitmap = await readExact(this.dev, entry * VHD_SECTOR, d.bitmapSize, (got) =>
        new FormatError(FORMAT, `block ${k} bitmap`, entry * VHD_SECTOR, `ends after ${got} bytes, at the end of the file`),
      );
      const sectors = length / VHD_SECTOR;
      let s = 0;
      while (s < sectors) {
        const present = bitmapTest(bitmap, s);
        let e = s + 1;
        while (e < sectors) {
          if ((e & 7) === 0 && e + 8 <= sectors) {
            const byte = bitmap[e >> 3]!;
            if (byte === (present ? 0xff : 0x00)) {
              e += 8;
              continue;
            }
          }
          if (bitmapTest(bitmap, e) !== present) break;
          e++;
        }
        const g = guest + s * VHD_SECTOR;
        const len = (e - s) * VHD_SECTOR;
        map.push(present ? { guest: g, length: len, kind: 'data', host: host + s * VHD_SECTOR } : { guest: g, length: len, kind: 'unallocated' });
        s = e;
      }
    }
    return (this.mapCache = map);
  }

  async hostSpace(): Promise<HostSpace> {
    const hs = new HostSpace(FORMAT, this.fileSize);
    const d = this.dyn;
    if (!d) {
      hs.add(0, this.virtualSize, 'data', 'data');
      hs.add(this.lf.at, FOOTER_SIZE, 'header', 'footer');
      return hs;
    }
    // Structures as found: overlaps surface from HostSpace.finish(), blocks past the end of the file
    // as ranges beyond fileSize; check() and mapping() name them.
    const layout = this.layout();
    for (const s of layout.structures) hs.add(s.start, s.length, s.role, s.what);
    for (const k of layout.order) {
      const at = d.bat[k]! * VHD_SECTOR;
      hs.add(at, d.bitmapSize, 'metadata', 'block bitmap');
      hs.add(at + d.bitmapSize, d.blockSize, 'data', 'block data');
    }
    return hs;
  }

  async check(): Promise<CheckReport> {
    const report: CheckReport = { format: FORMAT, corruptions: 0, leaks: 0, checkErrors: 0, messages: [], imageEndOffset: this.fileSize };
    const findings = new Findings();
    this.headerProblems(findings);
    const d = this.dyn;
    if (d) {
      const layout = this.layout();
      findings.merge(layout.problems);
      // Leaks: file space nothing references (meaningful only when nothing overlaps). Space that
      // reads as zeros — a hole, or the zeroed edges of one — wastes no disk space and is not counted:
      // an in-place conversion leaves the old format's structures unreferenced and punches them.
      if (!layout.problems.firstFatal()) {
        for (const f of (await this.hostSpace()).free()) {
          if (await readsZeros(this.dev, f.start, f.length)) continue;
          findings.add('leak', 'leak', 'free space', f.start, `${f.length} bytes at offset ${f.start} are not referenced by any structure`);
        }
      }
      const span = d.bitmapSize + d.blockSize;
      let end = 0;
      for (const s of layout.structures) end = Math.max(end, s.start + s.length);
      if (layout.order.length) end = Math.max(end, d.bat[layout.order[layout.order.length - 1]!]! * VHD_SECTOR + span);
      report.imageEndOffset = end;
      const blocks = Math.ceil(this.virtualSize / d.blockSize);
      // As qemu-img check counts for qcow2: an allocated block not right after the previous
      // allocated block (in guest order) is fragmented.
      let allocated = 0;
      let fragmented = 0;
      let expected = -1;
      for (let k = 0; k < blocks; k++) {
        const e = d.bat[k]!;
        if (e === BAT_UNUSED) continue;
        allocated++;
        if (expected >= 0 && e * VHD_SECTOR !== expected) fragmented++;
        expected = e * VHD_SECTOR + span;
      }
      report.totalClusters = blocks;
      report.allocatedClusters = allocated;
      report.fragmentedClusters = fragmented;
    }
    findings.report(report);
    return report;
  }

  async close(): Promise<void> {}

  /** Findings about the footer and header fields that do not stop reading. */
  private headerProblems(out: Findings): void {
    const f = this.lf.footer;
    const warn = (kind: string, field: string, value: unknown, message: string) => out.add('warning', kind, field, value, message);
    const bad = (kind: string, field: string, value: unknown, message: string) => out.add('corruption', kind, field, value, message);
    if (!(f.features & FEATURE_RESERVED)) warn('footer', 'footer features', f.features, `footer features 0x${f.features.toString(16)} lack the reserved bit 0x2 the specification requires`);
    if (f.version !== VHD_VERSION) warn('footer', 'footer version', f.version, `footer version 0x${f.version.toString(16)} is not 0x10000`);
    if (this.subformat === 'fixed' && f.dataOffset !== 0xffffffffffffffffn && f.dataOffset !== 0xffffffffn) {
      warn('footer', 'footer data offset', f.dataOffset, `fixed disk footer data offset ${f.dataOffset} is not all ones`);
    }
    const d = this.dyn;
    if (!d) return;
    if (!d.headerChecksumOk) {
      const computed = vhdChecksum(d.headerRaw, DYN_CHECKSUM_OFFSET);
      bad('checksum', 'dynamic header checksum', d.header.checksum, `dynamic header checksum 0x${d.header.checksum.toString(16)} does not match the computed 0x${computed.toString(16)} (QEMU ignores it)`);
    }
    if (d.header.version !== VHD_VERSION) warn('header', 'dynamic header version', d.header.version, `dynamic header version 0x${d.header.version.toString(16)} is not 0x10000`);
    if (d.header.dataOffset !== 0xffffffffffffffffn && d.header.dataOffset !== 0xffffffffn) {
      warn('header', 'dynamic header data offset', d.header.dataOffset, `dynamic header data offset ${d.header.dataOffset} is not all ones (no further structure is defined)`);
    }
    const eof = this.fileSize - FOOTER_SIZE;
    if (!d.eofFooter) bad('footer', 'footer', eof, 'no footer at the end of the file (only the copy at offset 0, which QEMU uses)');
    else if (!d.eofFooter.checksumOk) bad('checksum', 'footer checksum', eof, `the footer at the end of the file (offset ${eof}) has a bad checksum`);
    else if (d.eofFooter.differs.length) bad('footer', 'footer', eof, `the footer at the end of the file differs from the copy at offset 0 in: ${d.eofFooter.differs.join(', ')}`);
    for (const l of d.locators) {
      if (!l.error) continue;
      (this.subformat === 'differencing' ? bad : warn)('locator', `parent locator ${l.index}`, l.code, `parent locator ${l.index} (${printable(l.code)}): ${l.error}`);
    }
    if (this.subformat === 'differencing' && d.parent && d.parent.uuidMatch !== true) {
      const what =
        d.parent.uuidMatch === false
          ? `${d.parent.candidate.path} exists but its UUID is not the parent UUID ${formatUuid(d.header.parentUuid)}`
          : `no candidate parent exists (tried ${d.parent.candidate.path} first)`;
      bad('parent', 'parent', d.parent.candidate.path, `parent: ${what}`);
    }
    const blocks = Math.ceil(this.virtualSize / d.blockSize);
    for (let k = blocks; k < d.entries; k++) {
      if (d.bat[k] !== BAT_UNUSED) warn('bat', `BAT entry ${k}`, d.bat[k], `BAT entry ${k} is allocated (sector ${d.bat[k]}) but lies beyond the virtual size`);
    }
  }
}

/** Whether [start, start+length) of the file reads as zeros; holes are skipped without reading. */
async function readsZeros(dev: BlockDevice, start: number, length: number): Promise<boolean> {
  const end = start + length;
  const buf = new Uint8Array(Math.min(length, 1 << 20));
  for (let pos = start; pos < end; ) {
    const data = await dev.nextData(pos);
    if (data === null || data >= end) return true;
    const stop = Math.min(await dev.nextHole(data), end);
    for (let at = data; at < stop; ) {
      const piece = buf.subarray(0, Math.min(buf.length, stop - at));
      const n = await dev.read(piece, at);
      if (n === 0) return true;
      for (let i = 0; i < n; i++) if (piece[i] !== 0) return false;
      at += n;
    }
    pos = stop;
  }
  return true;
}

export function buildInfo(lf: LocatedFooter, subformat: Subformat, virtualSize: number, d: DynamicState | undefined): ImageInfo {
  const f = lf.footer;
  const g = f.geometry;
  const features: string[] = [];
  if (f.features & FEATURE_TEMPORARY) features.push('temporary disk');
  if (f.savedState) features.push('saved state');
  const details: ImageInfo['details'] = {
    'footer-location': lf.at === 0 ? 'offset 0 (copy; dynamic layout)' : `end of file (offset ${lf.at})`,
    'footer-checksum-ok': footerChecksumOk(lf.buf),
    features: `0x${f.features.toString(16).padStart(8, '0')}`,
    version: `${f.version >>> 16}.${f.version & 0xffff}`,
    'creator-app': printable(f.creatorApp),
    'creator-version': `${f.creatorVersion >>> 16}.${f.creatorVersion & 0xffff}`,
    'creator-os': printable(f.creatorOs),
    'original-size': u64Detail(f.originalSize),
    'current-size': u64Detail(f.currentSize),
    geometry: `${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`,
    'size-source': sizeSource(f.creatorApp, g),
    'disk-type': f.diskType,
    uuid: formatUuid(f.uuid),
    'saved-state': f.savedState !== 0,
    timestamp: vhdTimestampIso(f.timestamp),
  };
  const uuid = formatUuid(f.uuid);
  const creator = printable(f.creatorApp).trim();
  const carried: ImageInfo['carried'] = {
    ...(/^[0-]+$/.test(uuid) ? {} : { uuid: uuid.toLowerCase() }),
    geometry: `${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`,
    ...(creator ? { creator } : {}),
  };
  const info: ImageInfo = { format: FORMAT, subformat, virtualSize, dirty: false, corrupt: false, features, details, carried };
  if (!d) return info;
  info.clusterSize = d.blockSize;
  let allocated = 0;
  for (const e of d.bat) if (e !== BAT_UNUSED) allocated++;
  Object.assign(details, {
    'block-size': d.blockSize,
    'bitmap-size': d.bitmapSize,
    'max-table-entries': d.entries,
    'table-offset': d.tableOffset,
    'header-offset': d.headerOffset,
    'header-checksum-ok': d.headerChecksumOk,
    'allocated-blocks': allocated,
    'eof-footer': !d.eofFooter ? 'missing' : !d.eofFooter.checksumOk ? 'bad checksum' : d.eofFooter.differs.length ? `differs (${d.eofFooter.differs.join(', ')})` : 'matches copy',
  });
  if (subformat === 'differencing') {
    const h = d.header;
    Object.assign(details, {
      'parent-uuid': formatUuid(h.parentUuid),
      'parent-timestamp': vhdTimestampIso(h.parentTimestamp),
      'parent-name': h.parentName,
      'parent-locators': d.locators.map((l) => `${printable(l.code)}${l.stored !== undefined ? ` ${JSON.stringify(l.stored)}` : ''}${l.error ? ` (unusable: ${l.error})` : ''}`).join('; '),
      'parent-source': d.parent!.candidate.source,
      'parent-uuid-match': d.parent!.uuidMatch,
    });
    const backing: BackingRef = { filename: d.parent!.candidate.path, format: FORMAT };
    info.backing = backing;
    features.push('differencing (parent)');
  }
  return info;
}
