/**
 * qemu-img style target options on the command line, shared by every command that takes them
 * (`plan`, `inplace`, `stream`, `measure`), and the relocation window of `plan` / `inplace` / `recover`.
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

/**
 * The smallest `--move-window`: one file-system block. The engine takes any positive window (a round
 * always moves at least one unit), but below a block every round is one unit anyway for QED (4 KiB
 * clusters at least), and a bare `64` meant as 64 MiB would otherwise run a conversion in a million rounds.
 */
export const MIN_MOVE_WINDOW = 4096;

const SIZE_UNITS: Record<string, number> = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 };

/** A size as the CLI takes it: bytes, or a whole number with K, M, G or T (powers of 1024; KiB/KB and k also). */
export function parseSize(option: string, v: string): number {
  const m = /^(\d+)\s*([kKmMgGtT]?)(?:i?B)?$/.exec(v.trim());
  const n = m ? Number(m[1]) * SIZE_UNITS[m[2]!.toUpperCase()]! : NaN;
  if (!Number.isSafeInteger(n)) throw new UsageError(`${option} ${v}: expected a size in bytes or with K, M, G (e.g. 64M, 512K, 1048576)`);
  return n;
}

/** `--move-window SIZE` parsed and checked against the minimum; undefined when not given. */
export function parseMoveWindow(v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = parseSize('--move-window', v);
  if (n < MIN_MOVE_WINDOW) throw new UsageError(`--move-window ${v}: at least ${MIN_MOVE_WINDOW} bytes (4K)`);
  return n;
}

/** `dflt`: what applies without the option (`recover`: the window the interrupted conversion ran with). */
export const moveWindowOption = (dflt = '64M'): Option =>
  new Option(
    '--move-window <size>',
    `most bytes of second copies on disk at once while data moves inside the image (relocation rounds, compaction batches): bounds the peak extra space at the cost of more rounds (e.g. 64M, 512K; at least 4K; default ${dflt})`,
  );
