// CUDA decoder of the szp format. Raw device pointers in, stream last
// (FlashInfer / bitsandbytes convention); returns a cudaError_t as int.
#pragma once
#include <cstdint>

#include "moeoffload/szp.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

// Decodes the buffer at device address `device_buf` (a byte-identical copy of
// the host buffer that `view` was parsed from) into `device_out`.
int szp_decode_cuda(const SzpView& view, const uint8_t* device_buf, void* device_out, cudaStream_t stream);

}  // namespace moeoffload
