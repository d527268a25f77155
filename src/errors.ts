/**
 * Typed errors. Every refusal names what was wrong and, where there is one, the field and the value,
 * so a user can act on it. The CLI maps each class to an exit code.
 */

/** Base class: everything imgconv throws on purpose. */
export class ImgconvError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** An on-disk field holds a value the format does not allow (hostile or corrupt input). */
export class FormatError extends ImgconvError {
  constructor(
    readonly format: string,
    readonly field: string,
    readonly value: unknown,
    readonly reason: string,
  ) {
    super(`${format}: ${field} = ${formatValue(value)}: ${reason}`);
  }
}

/** A valid image that uses a feature imgconv does not handle (yet). */
export class UnsupportedError extends ImgconvError {
  constructor(
    readonly format: string,
    readonly feature: string,
    detail: string,
  ) {
    super(`${format}: unsupported ${feature}: ${detail}`);
  }
}

/** The file is in use (another imgconv, or a running QEMU holding its locks). */
export class LockedError extends ImgconvError {}

/** The user asked for something that cannot be done as asked (bad option, unknown format, ...). */
export class UsageError extends ImgconvError {}

/** An I/O failure with the operation and offset that failed. */
export class IoError extends ImgconvError {
  constructor(
    readonly op: string,
    readonly path: string,
    readonly offset: number,
    readonly code: string | undefined,
    message: string,
  ) {
    super(`${op} ${path} at offset ${offset}: ${message}`);
  }
}

/**
 * The file is not there (no such file, or a path component is not a directory): what a search among
 * candidate files expects. Any other I/O error is reported, never taken for "not this one".
 */
export function isMissingFile(e: unknown): boolean {
  return e instanceof IoError && (e.code === 'ENOENT' || e.code === 'ENOTDIR');
}

export function formatValue(v: unknown): string {
  if (typeof v === 'number') {
    return Number.isInteger(v) && Math.abs(v) >= 4096 ? `${v} (0x${v.toString(16)})` : String(v);
  }
  if (typeof v === 'bigint') return `${v} (0x${v.toString(16)})`;
  if (typeof v === 'string') return JSON.stringify(v);
  return String(v);
}
