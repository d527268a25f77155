/**
 * The registry: the one place that lists the format drivers. The core receives this list and never
 * names a format itself. Order matters only for ties in probing (raw is last and scores 1).
 */
import type { FormatDriver } from '../src/driver.js';
import { rawDriver } from './raw/index.js';

export const allDrivers: readonly FormatDriver[] = [rawDriver];
