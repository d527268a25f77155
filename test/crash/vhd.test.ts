/** Crash and fault states of every conversion from a vhd source (see harness.ts, suite.ts). */
import { definePairSuite } from './suite.js';

definePairSuite('vhd');
