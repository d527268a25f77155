/**
 * Facts about the files of a batch that images' own I/O does not give: which file a name really
 * is (so one image named twice, or through a symlink, is converted once), which filesystem it is
 * on (the scheduling lane) and how much room that filesystem has (the dry run's space check).
 * An interface, so tests can describe any layout of names, links and filesystems.
 */
import { realpath, stat, statfs } from 'node:fs/promises';
import { resolve } from 'node:path';
import { IoError } from '../errors.js';

export interface FileFacts {
  /** Absolute path with every symlink resolved. */
  realPath: string;
  /** The filesystem (st_dev). */
  device: string;
  /** The file on that filesystem (st_ino): with `device`, the same for every name of one file. */
  inode: string;
  /** File length in bytes. */
  size: number;
}

export interface BatchFileSystem {
  /** Throws an IoError (code ENOENT for a missing file) when the name does not lead to a file. */
  identify(path: string): Promise<FileFacts>;
  /** Bytes an unprivileged writer can still use on the path's filesystem, or undefined when unknown. */
  freeBytes(path: string): Promise<number | undefined>;
  /** The absolute form of a name that cannot be identified (for keys and messages). */
  absolute(path: string): string;
}

export const nodeBatchFileSystem: BatchFileSystem = {
  async identify(path) {
    try {
      const real = await realpath(path);
      const st = await stat(real, { bigint: true });
      if (!st.isFile() && !st.isBlockDevice()) throw Object.assign(new Error('not a regular file'), { code: 'EINVAL' });
      return { realPath: real, device: String(st.dev), inode: String(st.ino), size: Number(st.size) };
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new IoError('open', path, 0, err.code, err.message ?? String(e));
    }
  },
  async freeBytes(path) {
    try {
      const s = await statfs(path);
      return s.bavail * s.bsize;
    } catch {
      return undefined;
    }
  },
  absolute: (path) => resolve(path),
};
