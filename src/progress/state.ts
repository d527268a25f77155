/** In which state a failed `inplace` left the image, for every kind of output. */
import { ConversionFailedError, InterruptedConversionError } from '../engine/convert.js';
import { ImgconvError } from '../errors.js';

export type ImageState = ConversionFailedError['imageState'];

/**
 * A ConversionFailedError says it; anything else imgconv throws on purpose came before the first
 * write (planning refused, the lock was taken), except an earlier interrupted conversion, which needs
 * `imgconv recover`. After an internal error the state is not known.
 */
export function imageStateOf(error: unknown): ImageState | undefined {
  if (error instanceof ConversionFailedError) return error.imageState;
  if (error instanceof InterruptedConversionError) return 'needs-recover';
  if (error instanceof ImgconvError) return 'untouched';
  return undefined;
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
