// szpe on the GPU, a warp a stream: lane j holds rANS state j, which codes value j of every szp
// block (rans.h), so the warp decodes a 32-value block in one step. Per block each active lane looks
// up its symbol in the CTA's shared table, the lanes whose state fell below 2^16 read their word in
// lane order (a ballot, and a popcount of the lanes below), and escaped lanes take their stored value
// the same way. Then a sink uses the block's 32 q values:
//   szpe_to_szp_cuda (SzpSink): the transcode into fixed-width szp, the runtime's arrival step when
//     host memory and the bus carry szpe and the device cache holds szp. The block's width from a
//     warp min/max, its w words each an OR-reduction of the lanes' fields; lane 0 writes the widths
//     and the segment's offsets, and szp's exception table entries of its exceptions.
//   szpe_decode_values_cuda (ValueSink): values, 32 consecutive ones a block (coalesced), then the
//     stream's exceptions patched by the same warp.
// The CPU decoders (cpp/kernels/szpe_decode.cpp) are the reference: the same streams in the same
// order, checked the same way (a stream must use up its bytes and escapes and end in the encoder's
// initial states); tests/test_szpe.py compares the two bit for bit. A corrupt stream makes its warp
// stop and set *failed; it never reads or writes outside its own ranges.
#include <cuda_runtime.h>

#include "moeoffload/szpe_cuda.h"
#include "szpe_decode.cuh"

namespace moeoffload {

namespace {

using namespace szpe_cuda;

bool misaligned(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 7) != 0;
}

template <class Sink, class Frame = NoFrame>
int launch(const SzpeView& e, const uint8_t* device_in, const Sink& sink, int* device_failed, cudaStream_t stream,
           const Frame& frame = Frame{}) {
  const uint64_t blocks = grid_blocks(e);
  if (blocks > 0x7FFFFFFFull) return cudaErrorInvalidConfiguration;
  szpe_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(device_in, e, sink, frame, device_failed);
  return cudaGetLastError();
}

}  // namespace

int szpe_to_szp_cuda(const SzpeView& e, const uint8_t* device_in, uint8_t* device_out, int* device_failed,
                     cudaStream_t stream) {
  if (misaligned(device_in, device_out)) return cudaErrorMisalignedAddress;
  return launch(e, device_in, SzpSink{device_in, device_out}, device_failed, stream, szp_frame(e));
}

int szpe_decode_values_cuda(const SzpeView& e, const uint8_t* device_in, void* device_out, int* device_failed,
                            cudaStream_t stream) {
  if (misaligned(device_in, device_out)) return cudaErrorMisalignedAddress;
  switch (e.szp.dtype) {
    case DType::F32:
      return launch(e, device_in, ValueSink<DType::F32>{device_in, static_cast<uint32_t*>(device_out)},
                    device_failed, stream);
    case DType::BF16:
      return launch(e, device_in, ValueSink<DType::BF16>{device_in, static_cast<uint16_t*>(device_out)},
                    device_failed, stream);
    case DType::F16:
      return launch(e, device_in, ValueSink<DType::F16>{device_in, static_cast<uint16_t*>(device_out)},
                    device_failed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moeoffload
