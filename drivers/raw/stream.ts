/**
 * raw as a stream: the guest bytes in order, zeros where the source has no data. Read back, every
 * byte is guest data and the stream's length is the disk's size.
 */
import { checkStreamOptions, copyGuest } from '../../src/stream/copy.js';
import type { StreamHead, StreamLayout, StreamTarget } from '../../src/stream/types.js';

const FORMAT = 'raw';
const READ_CHUNK = 1 << 20;

export const rawStream: StreamTarget = {
  identity: true,

  layout(input): StreamLayout {
    checkStreamOptions(FORMAT, input.options, []);
    const vs = input.virtualSize;
    return {
      format: FORMAT,
      parameters: {},
      size: vs,
      fullyAllocated: vs,
      readBytes: input.data.bytes,
      async write(source, sink) {
        let at = 0;
        for (const [start, end] of input.data) {
          await sink.zeros(start - at);
          await copyGuest(source, sink, start, end);
          at = end;
        }
        await sink.zeros(vs - at);
      },
    };
  },

  reader: {
    async readHead(): Promise<StreamHead> {
      return {
        format: FORMAT,
        async readData(input, emit) {
          for (;;) {
            const at = input.position;
            const bytes = await input.readUpTo(READ_CHUNK);
            if (bytes.length === 0) return at;
            await emit(at, bytes);
          }
        },
      };
    },
  },
};
