// CUDA decoder of the szp format. Raw device pointers in, stream last
// (FlashInfer / bitsandbytes convention); returns a cudaError_t as int.
#pragma once
#include <cstdint>

#include "moeoffload/cpu_kernels.h"
#include "moeoffload/szp.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

// Decodes the buffer at device address `device_buf` (a byte-identical copy of
// the host buffer that `view` was parsed from) into `device_out`.
int szp_decode_cuda(const SzpView& view, const uint8_t* device_buf, void* device_out, cudaStream_t stream);

// y[T, rows] = x[T, cols] · Ŵᵀ straight from the device bytes of `w`
// (cuda/szp_linear.cu); x and y device arrays of dtype xt.
int szp_linear_cuda(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, cudaStream_t stream);
// The same with y of dtype yt (xt, or float32).
int szp_linear_cuda_typed(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, DType yt,
                          cudaStream_t stream);

// The expert MLP (cuda/expert_mlp.cu): gate_up and down projections with the
// fused linear kernel, the activation between them on a float32 scratch of
// T x (3I + H) floats that the caller provides in device memory.
int expert_mlp_cuda(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, float* scratch, void* y,
                    cudaStream_t stream);

}  // namespace moeoffload
