/** The library API. */
export * from './errors.js';
export type { BlockDevice, OpenOptions, DeviceOpener } from './blockdev/types.js';
export { readAt, readExact } from './blockdev/types.js';
export { FileBlockDevice, openFileDevice } from './blockdev/file.js';
export { MemoryBlockDevice } from './blockdev/memory.js';
export { ExtentMap, type Extent, type ExtentKind } from './extent-map.js';
export { HostSpace, type HostRange, type HostRole } from './host-space.js';
export type { FormatDriver, SourceImage, ImageInfo, CheckReport, BackingRef, ProbeInput, OpenContext } from './driver.js';
export { openImage, probe, type ImageChain, type OpenImageOptions } from './image.js';
export { GuestReader } from './guest.js';
export { mapChain, type MapEntry } from './map.js';
export { checkImage, checkExitCode } from './check.js';
export { allDrivers } from '../drivers/index.js';
export {
  planConversion,
  convertInPlace,
  ConversionFailedError,
  InterruptedConversionError,
  type ConvertOptions,
  type ConversionPlan,
  type ConversionReport,
  type ProgressEvent,
  type Phase,
} from './engine/convert.js';
export { recover, type RecoverOptions, type RecoverReport } from './engine/recover.js';
export { fileStorage, MemoryStorage, type Storage } from './blockdev/storage.js';
export type { TargetDriver, TargetPlan, TargetOptions, PlanInput, Allocator, TargetBuild, Relocatable } from './driver.js';
export {
  convertMany,
  planMany,
  batchExitCode,
  Manifest,
  readManifest,
  parseManifest,
  latestStates,
  fileManifestIo,
  nodeBatchFileSystem,
  scheduleLimits,
  MANIFEST_VERSION,
  IMAGE_OUTCOMES,
  type ConvertManyOptions,
  type PlanManyOptions,
  type BatchReport,
  type BatchPlan,
  type PlanRow,
  type PlanOutcome,
  type FilesystemNeed,
  type BatchEvent,
  type BatchImage,
  type ImageResult,
  type ImageOutcome,
  type ImageStateAfter,
  type ManifestRecord,
  type ManifestState,
  type ManifestIo,
  type ManifestAppender,
  type BatchFileSystem,
  type FileFacts,
  type ScheduleLimits,
} from './batch/index.js';
export {
  measureExport,
  streamExport,
  prepareExport,
  StreamInterruptedError,
  type ExportOptions,
  type MeasureReport,
  type ExportReport,
  type PreparedExport,
} from './stream/export.js';
export { unstreamImage, type UnstreamOptions, type UnstreamReport } from './stream/import.js';
export type { StreamSink, StreamTarget } from './stream/types.js';
