/**
 * qemu-img style target options on the command line, shared by every command that takes them
 * (`plan`, `inplace`, `stream`, `measure`).
 */
import { Option } from 'commander';
import type { TargetOptions } from './driver.js';
import { UsageError } from './errors.js';

/**
 * `-o` takes one value and may be repeated (as qemu-img's does): a variadic option would swallow the
 * image names that follow it (`-o subformat=fixed disk.vhd`).
 */
export const targetOptionsOption = (): Option =>
  new Option('-o, --options <opts>', 'target options key=value[,key=value] (qemu-img names); repeatable').argParser((v: string, prev: string[] | undefined) => [...(prev ?? []), v]);

/** Parses `-o key=value,key=value` (repeatable) into one options object. */
export function parseTargetOptions(values: string[] | undefined): TargetOptions {
  const out: TargetOptions = {};
  for (const v of values ?? []) {
    for (const part of v.split(',')) {
      if (!part) continue;
      const eq = part.indexOf('=');
      if (eq <= 0) throw new UsageError(`-o ${part}: expected key=value`);
      out[part.slice(0, eq)] = part.slice(eq + 1);
    }
  }
  return out;
}
