/**
 * The registry: the one place that lists the format drivers. The core receives this list and never
 * names a format itself. Order matters only for ties in probing (raw is last and scores 1).
 */
import type { FormatDriver } from '../src/driver.js';
import { qcow2Driver } from './qcow2/index.js';
import { qedDriver } from './qed/index.js';
import { rawDriver } from './raw/index.js';
import { vhdDriver } from './vhd/index.js';
import { vmdkDriver } from './vmdk/index.js';

export const allDrivers: readonly FormatDriver[] = [qcow2Driver, qedDriver, vmdkDriver, vhdDriver, rawDriver];
