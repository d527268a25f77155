/**
 * Helpers for the VHD target tests: a conversion judged by qemu-img (compare against a copy taken
 * before, info, check) with the plan held against what was done and against the bytes of the file,
 * and a decoder of the converted file's footer, header and BAT.
 */
import { closeSync, copyFileSync, openSync, readSync, statSync } from 'node:fs';
import { expect } from 'vitest';
import { allDrivers } from '../../drivers/index.js';
import { BAT_UNUSED, decodeDynHeader, decodeFooter, footerChecksumOk, type DynHeader, type VhdFooter } from '../../drivers/vhd/format.js';
import { BITMAP_SIZE, BLOCK_SIZE, HEAD_BYTES, batBytesFor } from '../../drivers/vhd/target.js';
import type { CheckReport, ImageInfo } from '../../src/driver.js';
import { convertInPlace, planConversion, type ConversionPlan, type ConversionReport } from '../../src/engine/convert.js';
import { openImage } from '../../src/image.js';
import { digestFileInChild, qemuImg, qemuImgStatus } from '../support/qemu.js';

export interface VhdFile {
  length: number;
  footer: VhdFooter;
  /** The last 512 bytes, decoded (fixed: the only footer). */
  eofFooter: VhdFooter;
  eofFooterBytes: Uint8Array;
  headBytes: Uint8Array;
  header?: DynHeader;
  bat?: number[];
}

function readRange(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, offset + done);
    if (n === 0) break;
    done += n;
  }
  return buf;
}

/** Footer(s), dynamic header and BAT of a VHD file, as its bytes say (no driver involved). */
export function readVhdFile(file: string): VhdFile {
  const length = statSync(file).size;
  const fd = openSync(file, 'r');
  try {
    const tail = new Uint8Array(readRange(fd, length - 512, 512));
    expect(footerChecksumOk(tail), 'footer checksum at the end of the file').toBe(true);
    const head = readRange(fd, 0, 1536);
    const out: VhdFile = { length, footer: decodeFooter(tail), eofFooter: decodeFooter(tail), eofFooterBytes: tail, headBytes: new Uint8Array(head.subarray(0, 512)) };
    if (head.subarray(0, 8).toString('latin1') === 'conectix') {
      expect(footerChecksumOk(out.headBytes), 'footer copy checksum').toBe(true);
      out.footer = decodeFooter(out.headBytes);
      out.header = decodeDynHeader(new Uint8Array(head.subarray(512, 1536)));
      const entries = out.header.maxTableEntries;
      const bat = readRange(fd, Number(out.header.tableOffset), entries * 4);
      out.bat = [];
      for (let i = 0; i < entries; i++) out.bat.push(bat.readUInt32BE(4 * i));
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

export interface Judged {
  plan: ConversionPlan;
  report: ConversionReport;
  /** qemu-img info of the result. */
  info: Record<string, unknown>;
  file: VhdFile;
  /** The read driver's view of the result. */
  ours: { info: ImageInfo; check: CheckReport };
}

/**
 * Plans, then converts `file` (format `srcFmt`) to VHD in place after keeping a copy at `${file}.orig`,
 * and holds the result against the copy: qemu-img compare identical, qemu-img info vpc of the same
 * virtual size, qemu-img check (QEMU has no vpc check: exit 63, said so), our own check clean; the
 * plan is what was done, and its metadata bytes are the structures found in the file.
 */
export async function convertAndJudge(file: string, srcFmt: string, options: Record<string, string> = {}): Promise<Judged> {
  const copy = `${file}.orig`;
  copyFileSync(file, copy);
  const before = JSON.parse(qemuImg(['info', '--output=json', '-f', srcFmt, copy])) as Record<string, unknown>;
  const plan = await planConversion(file, { to: 'vhd', drivers: allDrivers, options });
  const [a, b] = await Promise.all([digestFileInChild(file, 'chunked'), digestFileInChild(copy, 'chunked')]);
  expect(a, 'plan must not write').toBe(b);
  const report = await convertInPlace(file, { to: 'vhd', drivers: allDrivers, options });
  expect(report.metadataBytes).toBe(plan.metadataBytes);
  expect(report.dataMoveBytes).toBe(plan.dataMoveBytes);
  expect(report.written.dataBytes).toBe(plan.dataMoveBytes);
  expect(report.written.compactionBytes).toBe(0);
  expect(report.moves.map((m) => [m.guest, m.length])).toEqual(plan.moves.map((m) => [m.guest, m.length]));

  const cmp = qemuImgStatus(['compare', '-f', srcFmt, '-F', 'vpc', copy, file]);
  expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  expect(cmp.status).toBe(0);
  const info = JSON.parse(qemuImg(['info', '--output=json', '-f', 'vpc', file])) as Record<string, unknown>;
  expect(info.format).toBe('vpc');
  expect(info['virtual-size']).toBe(before['virtual-size']);
  const chk = qemuImgStatus(['check', '-f', 'vpc', file]);
  expect(chk.status, chk.stdout + chk.stderr).toBe(63);
  expect(chk.stderr).toContain('does not support checks');

  const chain = await openImage(file, { drivers: allDrivers, format: 'vhd', backing: false });
  let ours: Judged['ours'];
  try {
    const img = chain.layers[0]!;
    ours = { info: img.info, check: await img.check() };
  } finally {
    await chain.close();
  }
  expect(ours.check.corruptions, ours.check.messages.join('\n')).toBe(0);
  expect(ours.check.checkErrors).toBe(0);
  expect(ours.info.details['eof-footer'] ?? 'matches copy').toBe('matches copy');
  // The old format's structures are unreferenced now, and punched: zeros, not leaks.
  expect(ours.check.leaks, ours.check.messages.join('\n')).toBe(0);
  expect(ours.check.messages).toEqual([]);

  const vhd = readVhdFile(file);
  expect(statSync(file).size).toBe(report.finalLength);
  expect(vhd.footer.currentSize).toBe(BigInt(before['virtual-size'] as number));
  expect(vhd.footer.creatorApp).toBe(report.target.parameters.creator_app);
  if (vhd.header) {
    // What the plan counted is what lies in the file: footer copy, header, BAT, a bitmap per
    // allocated block, the trailing footer; and every moved block's BAT entry is its new place.
    const allocated = vhd.bat!.filter((e) => e !== BAT_UNUSED).length;
    expect(report.metadataBytes).toBe(HEAD_BYTES + batBytesFor(vhd.header.maxTableEntries) + allocated * BITMAP_SIZE + 512);
    expect(vhd.header.blockSize).toBe(BLOCK_SIZE);
    for (const m of report.moves) expect(vhd.bat![m.guest / BLOCK_SIZE]! * 512 + BITMAP_SIZE).toBe(m.to);
    expect(Buffer.from(vhd.eofFooterBytes).equals(Buffer.from(vhd.headBytes))).toBe(true);
  }
  return { plan, report, info, file: vhd, ours };
}
