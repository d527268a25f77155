/**
 * The structural check of one image: the generic part (no two structures share host bytes, every
 * run inside the image's limits) and the driver's own (refcounts, leaks, table sanity).
 */
import type { CheckReport, SourceImage } from './driver.js';
import { FormatError } from './errors.js';

/** Exit codes of `qemu-img check`. */
export const CHECK_EXIT = { clean: 0, internalError: 1, corrupt: 2, leaks: 3 } as const;

export async function checkImage(img: SourceImage): Promise<CheckReport> {
  // The driver's check counts every problem the way qemu-img does; the generic overlap check runs
  // only when it found none, so a damaged image is not reported as "1 corruption" of ours.
  const report = await img.check();
  if (report.corruptions > 0 || report.checkErrors > 0) return report;
  try {
    await img.hostSpace();
  } catch (e) {
    if (!(e instanceof FormatError)) throw e;
    return { ...report, corruptions: report.corruptions + 1, messages: [...report.messages, `ERROR ${e.message}`] };
  }
  return report;
}

export function checkExitCode(r: CheckReport): number {
  if (r.checkErrors > 0) return CHECK_EXIT.internalError;
  if (r.corruptions > 0) return CHECK_EXIT.corrupt;
  if (r.leaks > 0) return CHECK_EXIT.leaks;
  return CHECK_EXIT.clean;
}
