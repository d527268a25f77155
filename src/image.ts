/**
 * Opening an image: probe (or take -f), open with the driver, then follow the backing chain with
 * loop and depth limits. Probing never decides silently that a raw disk is something else: the
 * result says the format was probed, and a probed image whose header then fails validation gets a
 * message that names `-f raw`.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import { openFileDevice } from './blockdev/file.js';
import { readAt, type BlockDevice, type DeviceOpener } from './blockdev/types.js';
import type { FormatDriver, ProbeInput, SourceImage } from './driver.js';
import { FormatError, ImgconvError, UsageError } from './errors.js';

export const PROBE_HEAD_BYTES = 65536;
/** Longer chains than this are refused (qemu-img hangs on a self-referencing backing file). */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenImageOptions {
  drivers: readonly FormatDriver[];
  /** Skip probing and use this driver (the CLI's -f). */
  format?: string;
  /** Open the top image for writing, with an exclusive lock. */
  write?: boolean;
  /** Follow backing files (default true). */
  backing?: boolean;
  opener?: DeviceOpener;
  /** An already-open device for the top image (the caller keeps ownership; close() leaves it open). */
  topDevice?: BlockDevice;
}

export interface ImageChain {
  /** layers[0] is the image named; layers[i+1] is the backing file of layers[i]. */
  layers: SourceImage[];
  /** Whether the top format was found by probing rather than given. */
  probed: boolean;
  /** Resolved path of each layer. */
  paths: string[];
  close(): Promise<void>;
}

export function findDriver(drivers: readonly FormatDriver[], name: string): FormatDriver {
  const d = drivers.find((x) => x.name === name) ?? drivers.find((x) => x.qemuName === name);
  if (!d) throw new UsageError(`unknown format "${name}" (known: ${drivers.map((x) => x.name).join(', ')})`);
  return d;
}

export async function probeInput(dev: BlockDevice): Promise<ProbeInput> {
  const size = await dev.size();
  const head = await readAt(dev, 0, Math.min(size, PROBE_HEAD_BYTES));
  const tail = await readAt(dev, Math.max(0, size - 512), Math.min(size, 512));
  return { head, tail, size, path: dev.path };
}

/** The driver with the highest probe score (raw scores 1, so it wins only when nothing else does). */
export async function probe(
  dev: BlockDevice,
  drivers: readonly FormatDriver[],
): Promise<{ driver: FormatDriver; score: number }> {
  const input = await probeInput(dev);
  let best: { driver: FormatDriver; score: number } | undefined;
  for (const d of drivers) {
    let score = 0;
    try {
      score = d.probe(input);
    } catch {
      score = 0;
    }
    if (score > 0 && (!best || score > best.score)) best = { driver: d, score };
  }
  if (!best) throw new UsageError(`${dev.path}: no driver recognises this file`);
  return best;
}

async function openLayer(
  dev: BlockDevice,
  path: string,
  driver: FormatDriver,
  opener: DeviceOpener,
): Promise<SourceImage> {
  return driver.open(dev, {
    path,
    openRelated: (name, opts) => opener(resolveRelated(path, name), { write: false, ...opts }),
  });
}

export function resolveRelated(imagePath: string, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(imagePath), name);
}

export async function openImage(path: string, opts: OpenImageOptions): Promise<ImageChain> {
  const opener = opts.opener ?? openFileDevice;
  const layers: SourceImage[] = [];
  const devs: BlockDevice[] = [];
  const paths: string[] = [];
  let probed = false;
  const closeAll = async () => {
    for (const l of layers) await l.close().catch(() => {});
    for (const d of devs) await d.close().catch(() => {});
  };
  try {
    let current = resolve(path);
    let format = opts.format;
    for (let depth = 0; ; depth++) {
      if (depth >= MAX_CHAIN_DEPTH) throw new UsageError(`${path}: backing chain longer than ${MAX_CHAIN_DEPTH} layers`);
      if (paths.includes(current)) {
        throw new FormatError(layers[layers.length - 1]!.format, 'backing file', current, 'the backing chain loops back to an image already in it');
      }
      const dev =
        depth === 0 && opts.topDevice ? opts.topDevice : await opener(current, { write: depth === 0 && (opts.write ?? false) });
      if (dev !== opts.topDevice) devs.push(dev);
      paths.push(current);
      let driver: FormatDriver;
      if (format) {
        driver = findDriver(opts.drivers, format);
      } else {
        driver = (await probe(dev, opts.drivers)).driver;
        if (depth === 0) probed = true;
      }
      let layer: SourceImage;
      try {
        layer = await openLayer(dev, current, driver, opener);
      } catch (e) {
        if (!format && e instanceof ImgconvError && driver.name !== 'raw') {
          e.message += ` (the format "${driver.name}" was probed from the file's first bytes; if this is a raw disk, pass -f raw)`;
        }
        throw e;
      }
      layers.push(layer);
      const backing = layer.info.backing;
      if (!backing || opts.backing === false) break;
      current = resolveRelated(current, backing.filename);
      format = backing.format;
    }
  } catch (e) {
    await closeAll();
    throw e;
  }
  return { layers, probed, paths, close: closeAll };
}
