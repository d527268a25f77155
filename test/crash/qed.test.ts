/** Crash and fault states of every conversion from a qed source (see harness.ts, suite.ts). */
import { definePairSuite } from './suite.js';

definePairSuite('qed');
