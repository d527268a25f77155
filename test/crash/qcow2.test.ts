/** Crash and fault states of every conversion from a qcow2 source (see harness.ts, suite.ts). */
import { definePairSuite } from './suite.js';

definePairSuite('qcow2');
