/**
 * The sources both identity-placed companion targets (VMDK monolithicFlat, qcow2 with a raw data file)
 * are judged on: a 64 MiB image of each kind with the same data runs and a zero run, and its copy at
 * `orig` (the reference for qemu-img compare).
 */
import { copyFileSync } from 'node:fs';
import { qemuImg, qemuIo } from '../support/qemu.js';

/** 'vpc-fixed' is a fixed VHD; the rest are qemu-img format names. A raw source is called disk.img. */
export type IdentitySourceKind = 'raw' | 'vpc-fixed' | 'qed' | 'qcow2';

export function makeIdentitySource(t: { path: (name: string) => string }, kind: IdentitySourceKind): { qfmt: string; file: string; vsize: number } {
  const qfmt = kind === 'vpc-fixed' ? 'vpc' : kind;
  const file = t.path(kind === 'raw' ? 'disk.img' : `disk.${qfmt}`);
  qemuImg(['create', '-q', '-f', qfmt, ...(kind === 'vpc-fixed' ? ['-o', 'subformat=fixed'] : []), file, '64M']);
  qemuIo(file, qfmt, ['write -P 0x41 0 1M', 'write -P 0x42 10M 3M', 'write -z 20M 64k', 'write -P 0x43 63M 1M']);
  const vsize = (JSON.parse(qemuImg(['info', '--output=json', '-f', qfmt, file])) as { 'virtual-size': number })['virtual-size'];
  copyFileSync(file, t.path('orig'));
  return { qfmt, file, vsize };
}
