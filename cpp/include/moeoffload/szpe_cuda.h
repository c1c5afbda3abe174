// CUDA transcoder of szpe into szp (cuda/szpe_transcode.cu): raw device pointers in, stream last;
// returns a cudaError_t as int.
#pragma once
#include <cstdint>

#include "moeoffload/szpe.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

// Writes the szp buffer of `view` (view.as_szp.total_bytes) at device_out from the szpe buffer at
// device_in (a byte-identical copy of the host buffer `view` was parsed from). Both 8-aligned
// (cudaErrorMisalignedAddress otherwise). A stream that does not decode cleanly sets *device_failed
// to 1 (the caller zeroes it before and reads it after the stream): the szp buffer is then not valid.
int szpe_to_szp_cuda(const SzpeView& view, const uint8_t* device_in, uint8_t* device_out, int* device_failed,
                     cudaStream_t stream);

}  // namespace moeoffload
