// Conversions between the activations' dtype and the float32 the fused CPU
// kernels compute in (RNE, the integer conversions of dtype.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "moeoffload/szp_block.h"

namespace moeoffload {


inline void to_f32(const void* src, DType t, uint64_t n, float* dst) {
  if (t == DType::F32) {
    memcpy(dst, src, n * 4);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (t == DType::BF16)
    for (uint64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  else
    for (uint64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
}

inline void from_f32(const float* src, uint64_t n, DType t, void* dst) {
  if (t == DType::F32) {
    memcpy(dst, src, n * 4);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (t == DType::BF16)
    for (uint64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  else
    for (uint64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
}

// x [T, cols] of dtype t -> float32 rows of round_up(cols, 32), zero padded.
inline std::vector<float> padded_f32(const void* x, DType t, uint32_t tokens, uint64_t cols, uint64_t* ldx) {
  *ldx = (cols + kSzpBlock - 1) / kSzpBlock * kSzpBlock;
  std::vector<float> out(static_cast<size_t>(tokens) * *ldx, 0.0f);
  const uint8_t* src = static_cast<const uint8_t*>(x);
  for (uint32_t i = 0; i < tokens; ++i) to_f32(src + i * cols * dtype_size(t), t, cols, out.data() + i * *ldx);
  return out;
}

}  // namespace moeoffload
