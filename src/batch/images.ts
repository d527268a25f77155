/**
 * The images of a batch: names as the user gave them, resolved to files, one entry per file.
 */
import type { BatchFileSystem } from './files.js';

export interface BatchImage {
  /** Position in the batch (0-based), in the order the names were given. */
  index: number;
  /** The first name the user gave for this file. */
  name: string;
  /** The real path (symlinks resolved): what is converted, and the manifest's key. */
  path: string;
  /** Other names given for the same file (a symlink to it, a second listing, a hard link). */
  aliases: string[];
  /** The filesystem it lives on (the scheduling lane). */
  device: string;
  /** File length when the batch began. */
  size: number;
}

/** A name that leads to no file (missing, a directory, no permission). */
export interface UnresolvedImage {
  index: number;
  name: string;
  /** Absolute form of the name. */
  path: string;
  error: unknown;
}

/**
 * Resolves names to files. Two names are the same image when they resolve to the same real path
 * or the same (device, inode): converting one file twice in parallel would race, and a second
 * conversion after the first would only find it already converted.
 */
export async function resolveImages(names: readonly string[], files: BatchFileSystem): Promise<{ images: BatchImage[]; unresolved: UnresolvedImage[] }> {
  const facts = await Promise.all(
    names.map((name) =>
      files.identify(name).then(
        (f) => ({ ok: true as const, f }),
        (error: unknown) => ({ ok: false as const, error }),
      ),
    ),
  );
  const images: BatchImage[] = [];
  const unresolved: UnresolvedImage[] = [];
  const byPath = new Map<string, BatchImage>();
  const byInode = new Map<string, BatchImage>();
  const seenUnresolved = new Set<string>();
  let index = 0;
  names.forEach((name, i) => {
    const r = facts[i]!;
    if (!r.ok) {
      const path = files.absolute(name);
      if (seenUnresolved.has(path)) return;
      seenUnresolved.add(path);
      unresolved.push({ index: index++, name, path, error: r.error });
      return;
    }
    const inodeKey = `${r.f.device}:${r.f.inode}`;
    const same = byPath.get(r.f.realPath) ?? byInode.get(inodeKey);
    if (same) {
      if (name !== same.name && !same.aliases.includes(name)) same.aliases.push(name);
      return;
    }
    const img: BatchImage = { index: index++, name, path: r.f.realPath, aliases: [], device: r.f.device, size: r.f.size };
    images.push(img);
    byPath.set(img.path, img);
    byInode.set(inodeKey, img);
  });
  return { images, unresolved };
}
