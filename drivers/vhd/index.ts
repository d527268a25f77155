/**
 * VHD (QEMU "vpc"): fixed, dynamic and differencing disks, read side.
 *
 * Opening follows QEMU's vpc_open: "conectix" at offset 0 means a dynamic or differencing disk and
 * the copy of the footer there is the one used; otherwise the last 512 bytes must be a fixed disk's
 * footer. A bad footer checksum is refused (modern QEMU: "Incorrect header checksum"). The virtual
 * size is QEMU's (see geometry.ts). Dynamic disks map like QEMU reads them: an allocated block is data
 * for its whole length (QEMU ignores the sector bitmap), an unallocated one reads as zeros.
 * Differencing disks are read as the spec says — the bitmap decides per sector, clear bits and
 * unallocated blocks come from the parent found through the parent locators — where QEMU opens them
 * as plain dynamic disks without a parent.
 *
 * Opening validates the headers (what QEMU validates, plus bounds before any allocation). Where the
 * blocks lie — past the end of the file, over each other or over metadata — is analysed on first
 * use: mapping() refuses such an image with a FormatError, check() lists every problem.
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import type { FormatDriver, OpenContext, ProbeInput, SourceImage } from '../../src/driver.js';
import { FormatError } from '../../src/errors.js';
import { FOOTER_CHECKSUM_OFFSET, FOOTER_COOKIE, FOOTER_SIZE, FORMAT, footerChecksumOk, hasCookie, vhdChecksum } from './format.js';
import { VHD_MAX_SECTORS, VHD_SECTOR, sizeSource, virtualSectors } from './geometry.js';
import { VhdImage, buildInfo } from './image.js';
import { locateFooter, openDynamic, subformatOf, type DynamicState } from './open.js';
import { vhdTarget } from './target.js';
import { vhdStream } from './stream.js';

export * from './format.js';
export * from './geometry.js';
export { MAX_BAT_BYTES } from './open.js';

export const vhdDriver: FormatDriver = {
  name: FORMAT,
  qemuName: 'vpc',
  description: 'Microsoft VHD (Virtual PC / Hyper-V; QEMU "vpc"): fixed, dynamic, differencing',
  target: vhdTarget,
  stream: vhdStream,

  probe(input: ProbeInput): number {
    const { head, tail } = input;
    if (hasCookie(head, FOOTER_COOKIE)) {
      // A bad checksum still beats raw, so that opening explains what is wrong instead of the file
      // silently reading as raw (QEMU probes the cookie alone).
      return head.length >= FOOTER_SIZE && footerChecksumOk(head.subarray(0, FOOTER_SIZE)) ? 100 : 50;
    }
    if (tail.length === FOOTER_SIZE && hasCookie(tail, FOOTER_COOKIE) && footerChecksumOk(tail)) return 100;
    // A pre-2004 511-byte footer: claimed, so that opening refuses it clearly.
    const at511 = tail.length - (FOOTER_SIZE - 1);
    if (at511 >= 0 && hasCookie(tail, FOOTER_COOKIE, at511) && footerChecksumOk(tail.subarray(at511))) return 100;
    return 0;
  },

  async open(dev: BlockDevice, ctx: OpenContext): Promise<SourceImage> {
    const fileSize = await dev.size();
    const lf = await locateFooter(dev, fileSize);
    if (!footerChecksumOk(lf.buf)) {
      const computed = vhdChecksum(lf.buf, FOOTER_CHECKSUM_OFFSET);
      throw new FormatError(FORMAT, 'footer checksum', lf.footer.checksum, `the footer at offset ${lf.at} sums to 0x${computed.toString(16)} (QEMU: "Incorrect header checksum")`);
    }
    const subformat = subformatOf(lf);
    const sectors = virtualSectors(lf.footer.creatorApp, lf.footer.geometry, lf.footer.currentSize);
    if (sectors > BigInt(VHD_MAX_SECTORS)) {
      const g = lf.footer.geometry;
      throw new FormatError(FORMAT, sizeSource(lf.footer.creatorApp, g) === 'chs' ? 'geometry' : 'current_size', `${sectors * 512n} bytes`, 'above the 2040 GiB VHD maximum (QEMU: EFBIG)');
    }
    const virtualSize = Number(sectors) * VHD_SECTOR;
    let dyn: DynamicState | undefined;
    if (subformat === 'fixed') {
      if (virtualSize > lf.at) {
        throw new FormatError(FORMAT, 'virtual size', virtualSize, `larger than the ${lf.at} bytes of data before the footer (QEMU would read the footer as guest data)`);
      }
    } else {
      dyn = await openDynamic(dev, ctx, lf, fileSize, virtualSize, subformat);
    }
    return new VhdImage(dev, buildInfo(lf, subformat, virtualSize, dyn), fileSize, subformat, lf, dyn);
  },
};
