// CUDA decoders of szpe (cuda/szpe_decode.cu, a warp a stream): raw device pointers in, stream
// last; each returns a cudaError_t as int. Both read a device copy, byte for byte, of the host buffer
// `view` was parsed from (validated there), and need it and the output 8-aligned
// (cudaErrorMisalignedAddress otherwise). A stream that does not decode cleanly sets *device_failed to
// 1 (the caller zeroes it before and reads it after the stream): the output is then not valid.
#pragma once
#include <cstdint>

#include "moeoffload/szpe.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

// The szp buffer of `view` (view.as_szp.total_bytes) at device_out: the arrival step of a device cache
// of fixed-width szp.
int szpe_to_szp_cuda(const SzpeView& view, const uint8_t* device_in, uint8_t* device_out, int* device_failed,
                     cudaStream_t stream);

// One tensor of a batched transcode.
struct SzpeTranscode {
  SzpeView view;
  const uint8_t* device_in;
  uint8_t* device_out;
};
constexpr int kSzpeBatchMax = 4;  // tensors a launch (its parameters stay under 4 KiB)

// The szp buffers of n tensors, kSzpeBatchMax a launch: their streams decode side by side, so an
// expert's arrival waits for its longest stream rather than for its matrices one after another.
int szpe_to_szp_cuda(const SzpeTranscode* jobs, int n, int* device_failed, cudaStream_t stream);

// The values (view.szp.numel of its dtype) at device_out: bit for bit szpe_decode_cpu's.
int szpe_decode_values_cuda(const SzpeView& view, const uint8_t* device_in, void* device_out, int* device_failed,
                            cudaStream_t stream);

}  // namespace moeoffload
