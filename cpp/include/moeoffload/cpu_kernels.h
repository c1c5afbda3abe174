// The CPU backend of the fused ops: y = x · Ŵᵀ and the expert MLP computed
// straight from szp bytes, never materialising Ŵ. They are also the reference
// the CUDA kernels are tested against.
//
// The product uses each weight as q * step before its rounding to the stored
// dtype: a row's dot product is accumulated on float(q) in float32 and scaled
// by the step once; values kept exactly (exceptions) are added with their
// stored value. The encoder keeps |w - q * step| <= eb (szp.h), so the fused
// product is that of a weight matrix within the bound.
#pragma once
#include <cstdint>

#include "moeoffload/szp.h"

namespace moeoffload {

// A parsed szp weight [rows, cols] stored row by row (segment_len == cols).
struct SzpMatrix {
  const uint8_t* buf = nullptr;  // host or device address of the whole buffer
  SzpView view{};
  uint64_t rows = 0, cols = 0;
};

// Throws Error(Shape) unless the view is a 2-D matrix with one segment per row.
SzpMatrix szp_matrix(const uint8_t* buf, const SzpView& view, const char* what = "weight");

// y[t, r] = sum_c x[t, c] * w[r, c] in float32. x rows are ldx >= cols apart
// and hold zeros from cols to round_up(cols, 32); y rows are ldy apart.
void szp_linear_f32(const SzpMatrix& w, const float* x, uint64_t ldx, uint32_t tokens, float* y, uint64_t ldy);

// y[T, rows] = x[T, cols] · Ŵᵀ, x and y of dtype xt (float32 accumulation).
void szp_linear_cpu(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y);

enum class Activation : uint8_t { Silu = 0, Gelu = 1, GeluTanh = 2, Relu = 3, GptOss = 4 };
enum class GateLayout : uint8_t { Concatenated = 0, Interleaved = 1 };

struct MlpConfig {
  Activation act = Activation::Silu;
  GateLayout layout = GateLayout::Concatenated;
  float alpha = 1.702f;  // GptOss: glu = gate * sigmoid(alpha * gate)
  float limit = 7.0f;    // GptOss: gate <= limit, -limit <= up <= limit; out = (up + 1) * glu
};

// y[T, H] = down(act(gate(x)) * up(x)) with gate_up [2I, H] (gate rows then
// up rows, or interleaved) and down [H, I]; biases (of dtype xt, or null) are
// added after each projection.
void expert_mlp_cpu(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, void* y);

}  // namespace moeoffload
