// CUDA decoder of the szp format. Raw device pointers in, stream last
// (FlashInfer / bitsandbytes convention); returns a cudaError_t as int.
#pragma once
#include <cstddef>
#include <cstdint>

#include "moeoffload/cpu_kernels.h"
#include "moeoffload/szp.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

// Decodes the buffer at device address `device_buf` (a byte-identical copy of
// the host buffer that `view` was parsed from) into `device_out`.
int szp_decode_cuda(const SzpView& view, const uint8_t* device_buf, void* device_out, cudaStream_t stream);

// y[T, rows] = x[T, cols] · Ŵᵀ straight from the device bytes of `w`
// (cuda/szp_linear.cu); x and y device arrays of dtype xt. A group of one.
int szp_linear_cuda(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, cudaStream_t stream);

// A group of matrices of one shape multiplied in one launch (per 16 of them): member i multiplies
// input rows [first, first + count) into the same rows of y ([*, rows] of yt).
struct LinearMember {
  SzpMatrix w;
  uint32_t first = 0, count = 0;
  const void* gate_up_bias = nullptr;  // Gated input: added to its gate and up values (xt, 2 x cols)
  const void* bias = nullptr;          // added to each output row (xt, rows)
};

constexpr uint32_t kMaxRowMap = 512;  // input rows a row map names

struct LinearInput {
  // Rows: x [*, cols] of xt, input row r is x's row row_of[r] (a host array of the members' rows, at
  // most kMaxRowMap), or row r without a map. Gated: x is float32 [*, 2 x cols], the gate and up
  // values of an expert MLP before the gate_up bias (of xt), and input row r is
  // act(gate) * up of x's row r (mlp_gate.h, cfg).
  const void* x = nullptr;
  DType xt = DType::F32;
  bool gated = false;
  MlpConfig cfg{};
  const uint32_t* row_of = nullptr;
};

// yt: xt, or float32 for a Rows input.
int szp_linear_group_cuda(const LinearInput& in, const LinearMember* members, size_t n, void* y, DType yt,
                          cudaStream_t stream);

// The expert MLP (cuda/expert_mlp.cu): the gate_up projection into a float32
// scratch of T x 2I values the caller provides in device memory, then the down
// projection of the activation (computed as it is staged) with its bias into y.
int expert_mlp_cuda(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, float* scratch, void* y,
                    cudaStream_t stream);

// The same for n experts in two launches: member i of gate_up and of down owns the same rows (its
// tokens; row_of maps them to x's rows, or null: row r is x's row r); the gate and up values go to
// gu (float32, [rows, 2I]), the outputs with the down members' biases to y ([rows, H] of xt).
int expert_mlp_group_cuda(const void* x, DType xt, const uint32_t* row_of, const LinearMember* gate_up,
                          const LinearMember* down, size_t n, const MlpConfig& cfg, float* gu, void* y,
                          cudaStream_t stream);

}  // namespace moeoffload
