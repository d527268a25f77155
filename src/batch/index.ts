/** Many images in one run: the batch runner, its dry run, the manifest and the scheduling rule. */
export { convertMany, batchExitCode, IMAGE_OUTCOMES, type ConvertManyOptions, type BatchReport, type BatchEvent, type ImageResult, type ImageOutcome, type ImageStateAfter } from './run.js';
export { planMany, type PlanManyOptions, type BatchPlan, type PlanRow, type PlanOutcome, type FilesystemNeed } from './plan.js';
export type { BatchImage, UnresolvedImage } from './images.js';
export { nodeBatchFileSystem, type BatchFileSystem, type FileFacts } from './files.js';
export {
  Manifest,
  readManifest,
  parseManifest,
  latestStates,
  encodeManifestRecord,
  decodeManifestRecord,
  fileManifestIo,
  MANIFEST_VERSION,
  MANIFEST_STATES,
  type ManifestRecord,
  type ManifestState,
  type ManifestIo,
  type ManifestAppender,
} from './manifest.js';
export { scheduleLimits, runScheduled, type ScheduleLimits } from './schedule.js';
