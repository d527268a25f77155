/**
 * Finding the parent of a differencing VHD from its parent locators.
 *
 * Each locator names the parent one way: W2ru a Windows path relative to the child (UTF-16), W2ku an
 * absolute Windows path (UTF-16), MacX a file:// URL (UTF-8); Wi2r/Wi2k (deprecated, code-page text)
 * and "Mac " (an alias blob) are not used. Windows writes the UTF-16 little-endian (blktap, DiscUtils,
 * Hyper-V files); big-endian data or a byte order mark is recognised too. The candidates are tried
 * in the order W2ru, W2ku, MacX, then the header's parent name (UTF-16BE, usually a bare file name);
 * the first whose footer UUID equals the header's parent UUID wins, else the first that exists.
 */
import { fileURLToPath } from 'node:url';
import { MAX_SAFE } from '../../src/binary.js';
import { readAt, type BlockDevice } from '../../src/blockdev/types.js';
import type { OpenContext } from '../../src/driver.js';
import { IoError, isMissingFile } from '../../src/errors.js';
import { decodeUtf16, type DynHeader, type ParentLocator } from './format.js';

/** Locator payloads are paths; anything longer than this is not one. */
export const MAX_LOCATOR_BYTES = 64 * 1024;

export interface LocatorInfo {
  index: number;
  code: string;
  /** Where the locator data lies and the space reserved for it (bytes), when they make sense. */
  offset?: number;
  /** Bytes of the file the locator owns: its data space, at least its data length. */
  space?: number;
  /** The decoded name as stored. */
  stored?: string;
  /** The name as a POSIX path (relative to the child's directory, or absolute). */
  path?: string;
  /** Why the locator cannot be used. */
  error?: string;
}

/**
 * Data space is specified in sectors, but Windows stores bytes. blktap's rule: values below 512 are
 * sectors, sector multiples are bytes, anything else is invalid.
 */
export function locatorSpaceBytes(dataSpace: number): number | undefined {
  if (dataSpace < 512) return dataSpace * 512;
  if (dataSpace % 512 === 0) return dataSpace;
  return undefined;
}

/** A Windows path as a POSIX one: backslashes become slashes; a leading ".\" stays relative. */
export function windowsPathToPosix(p: string): string {
  return p.replace(/\\/g, '/');
}

/** The path a MacX locator names ("file://localhost/a%20b" → "/a b"), or an error. */
export function macxPath(url: string): { path?: string; error?: string } {
  if (!/^file:\/\//i.test(url)) return { error: `MacX locator ${JSON.stringify(url)} is not a file:// URL` };
  try {
    return { path: fileURLToPath(url) };
  } catch (e) {
    return { error: `MacX locator ${JSON.stringify(url)}: ${(e as Error).message}` };
  }
}

/** Reads and decodes the 8 locators (those with a non-zero code). */
export async function readLocators(dev: BlockDevice, hdr: DynHeader, fileSize: number): Promise<LocatorInfo[]> {
  const out: LocatorInfo[] = [];
  for (let index = 0; index < hdr.locators.length; index++) {
    const l = hdr.locators[index]!;
    if (l.codeValue === 0) continue;
    out.push(await readLocator(dev, l, index, fileSize));
  }
  return out;
}

async function readLocator(dev: BlockDevice, l: ParentLocator, index: number, fileSize: number): Promise<LocatorInfo> {
  const info: LocatorInfo = { index, code: l.code };
  if (l.dataOffset > BigInt(MAX_SAFE)) return { ...info, error: `data offset ${l.dataOffset} is beyond any file` };
  const offset = Number(l.dataOffset);
  const spaceBytes = locatorSpaceBytes(l.dataSpace);
  if (spaceBytes === undefined) return { ...info, error: `data space ${l.dataSpace} is neither a sector count nor a multiple of 512 bytes` };
  if (l.dataLength > MAX_LOCATOR_BYTES) return { ...info, error: `data length ${l.dataLength} is longer than any path (${MAX_LOCATOR_BYTES} bytes)` };
  if (l.dataLength > spaceBytes) return { ...info, error: `data length ${l.dataLength} exceeds its data space of ${spaceBytes} bytes` };
  info.offset = offset;
  if (offset + l.dataLength > fileSize) {
    return { index, code: l.code, error: `data at ${offset} (+${l.dataLength}) runs past the end of the file (${fileSize} bytes)` };
  }
  // The data is in the file; the space reserved after it only counts up to the end of the file.
  info.space = Math.min(spaceBytes, fileSize - offset);
  const bytes = await readAt(dev, offset, l.dataLength);
  switch (l.code) {
    case 'W2ru':
    case 'W2ku': {
      const d = decodeUtf16(bytes);
      info.stored = d.text;
      if (!d.valid) return { ...info, error: `UTF-16 name is malformed (${JSON.stringify(d.text)})` };
      if (d.text === '') return { ...info, error: 'empty name' };
      info.path = windowsPathToPosix(d.text);
      return info;
    }
    case 'MacX': {
      let text: string;
      try {
        text = new TextDecoder('utf-8', { fatal: true }).decode(bytes).replace(/\0+$/, '');
      } catch {
        return { ...info, error: 'UTF-8 URL is malformed' };
      }
      info.stored = text;
      const m = macxPath(text);
      return m.path ? { ...info, path: m.path } : { ...info, error: m.error! };
    }
    default:
      return { ...info, error: `platform code ${JSON.stringify(l.code)} is not used to find parents` };
  }
}

export interface ParentCandidate {
  source: string;
  path: string;
}

const ORDER = ['W2ru', 'W2ku', 'MacX'];

export function parentCandidates(locators: LocatorInfo[], parentName: string): ParentCandidate[] {
  const out: ParentCandidate[] = [];
  for (const code of ORDER) {
    for (const l of locators) if (l.code === code && l.path) out.push({ source: code, path: l.path });
  }
  if (parentName !== '') out.push({ source: 'parent name', path: windowsPathToPosix(parentName) });
  return out;
}

export interface ParentChoice {
  candidate: ParentCandidate;
  /** true: the parent's footer UUID matches; false: it exists but does not; null: not found. */
  uuidMatch: boolean | null;
}

/**
 * Picks the parent: the first candidate whose VHD footer carries `uuid`, else the first that opens,
 * else the first (the chain opener then reports it missing). `footerUuid` reads a device's UUID.
 */
export async function chooseParent(
  candidates: ParentCandidate[],
  uuid: Uint8Array,
  ctx: OpenContext,
  footerUuid: (dev: BlockDevice) => Promise<Uint8Array | undefined>,
): Promise<ParentChoice | undefined> {
  let firstExisting: ParentCandidate | undefined;
  for (const c of candidates) {
    let dev: BlockDevice;
    try {
      dev = await ctx.openRelated(c.path);
    } catch (e) {
      // A candidate that is not there is the normal case; any other failure to open it is reported, not
      // skipped (skipping could pick another candidate as the parent).
      if (e instanceof IoError && !isMissingFile(e)) throw e;
      continue;
    }
    try {
      // A file too short or not a VHD has no UUID to match; an I/O error reading it is reported, for the
      // same reason.
      const u = await footerUuid(dev).catch((e: unknown) => {
        if (e instanceof IoError) throw e;
        return undefined;
      });
      if (u && Buffer.from(u).equals(Buffer.from(uuid))) return { candidate: c, uuidMatch: true };
      firstExisting ??= c;
    } finally {
      await dev.close().catch(() => {});
    }
  }
  if (firstExisting) return { candidate: firstExisting, uuidMatch: false };
  return candidates[0] ? { candidate: candidates[0], uuidMatch: null } : undefined;
}
