/**
 * raw as a conversion target: the file is the guest bytes, so every data byte must lie at its own
 * offset (identity placement). The engine relocates the source's data there before the commit
 * (src/engine/relocate.ts) and writes the guest bytes that the source's own headers and tables occupy
 * at the commit point; this driver only states the layout: no metadata, no fixed regions, and a
 * length of exactly the virtual size.
 */
import type { PlanInput, TargetBuild, TargetDriver, TargetPlan } from '../../src/driver.js';
import { UnsupportedError, UsageError } from '../../src/errors.js';
import { RAW_SECTOR } from './index.js';

export const rawTarget: TargetDriver = {
  plan(input: PlanInput): TargetPlan {
    const names = Object.keys(input.options);
    if (names.length > 0) throw new UsageError(`raw has no options (given: ${names.join(', ')})`);
    const { info } = input;
    if (info.backing) {
      throw new UnsupportedError(
        info.format,
        'backing file',
        `a raw disk has no backing file, and this image reads part of its content from ${info.backing.filename}; flatten it first (qemu-img rebase -b "" merges the backing file's data into it), or convert to qcow2 or QED, which keep the backing file`,
      );
    }
    if (info.virtualSize % RAW_SECTOR !== 0) {
      // QEMU sizes a raw file by its length rounded up to a sector: an odd length would read back
      // with a different virtual size.
      throw new UnsupportedError(info.format, 'virtual size', `${info.virtualSize} is not a multiple of ${RAW_SECTOR}; QEMU would see a raw file of this length as ${Math.ceil(info.virtualSize / RAW_SECTOR) * RAW_SECTOR} bytes`);
    }
    return {
      format: 'raw',
      parameters: {},
      fixedRegions: [],
      mustMove: [],
      dataAlignment: 1,
      dropped: [],
      metadataBytes: 0,
      placement: 'identity',
    };
  },
  build(_plan: TargetPlan, input: PlanInput): TargetBuild {
    return { writes: [], fixed: [], finalLength: input.info.virtualSize, metadataBytes: 0 };
  },
};
