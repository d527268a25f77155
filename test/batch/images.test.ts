/**
 * Resolving a batch's names to files: one entry per file whatever the names (repeated, a symlink,
 * a hard link on the same filesystem), names that lead nowhere kept once, order kept.
 */
import { describe, expect, it } from 'vitest';
import { linkSync, symlinkSync, writeFileSync } from 'node:fs';
import { resolveImages } from '../../src/batch/images.js';
import { nodeBatchFileSystem, type BatchFileSystem } from '../../src/batch/files.js';
import { IoError } from '../../src/errors.js';
import { withTmpDir } from '../support/qemu.js';

describe('resolveImages', () => {
  it('real files: a repeated name, a symlink and a hard link are one image with aliases; a missing name is kept once', async () => {
    const tmp = withTmpDir('imgconv-batch-names-');
    try {
      writeFileSync(tmp.path('a.img'), Buffer.alloc(4096, 1));
      writeFileSync(tmp.path('b.img'), Buffer.alloc(8192, 2));
      symlinkSync('a.img', tmp.path('sym.img'));
      linkSync(tmp.path('a.img'), tmp.path('hard.img'));
      const names = [tmp.path('a.img'), tmp.path('missing.img'), tmp.path('sym.img'), tmp.path('b.img'), tmp.path('hard.img'), tmp.path('a.img'), tmp.path('missing.img')];
      const { images, unresolved } = await resolveImages(names, nodeBatchFileSystem);
      expect(images.map((i) => [i.index, i.name, i.size])).toEqual([
        [0, tmp.path('a.img'), 4096],
        [2, tmp.path('b.img'), 8192],
      ]);
      expect(images[0]!.aliases).toEqual([tmp.path('sym.img'), tmp.path('hard.img')]);
      expect(images[0]!.device).toBe(images[1]!.device);
      expect(unresolved.map((u) => [u.index, u.name])).toEqual([[1, tmp.path('missing.img')]]);
      expect(unresolved[0]!.error).toBeInstanceOf(IoError);
      expect((unresolved[0]!.error as IoError).code).toBe('ENOENT');
    } finally {
      tmp.cleanup();
    }
  });

  it('the same inode number on two filesystems is two images', async () => {
    const files: BatchFileSystem = {
      identify: async (p) => ({ realPath: p, device: p.startsWith('/a/') ? '1' : '2', inode: '42', size: 1 }),
      freeBytes: async () => undefined,
      absolute: (p) => p,
    };
    const { images } = await resolveImages(['/a/x.img', '/b/x.img', '/a/y.img'], files);
    // /a/y.img has /a/x.img's device and inode: the same file under another name.
    expect(images.map((i) => [i.name, i.aliases])).toEqual([
      ['/a/x.img', ['/a/y.img']],
      ['/b/x.img', []],
    ]);
  });
});
