// Element types of the codec and exact, branch-light conversions between them.
//
// The same functions run on the host (encoder check, CPU decoder) and on the
// device (CUDA decoder), so the CPU and GPU decoders agree bit for bit: every
// conversion is integer arithmetic with round-to-nearest-even, no intrinsics.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOEOFFLOAD_HD __host__ __device__ __forceinline__
#else
#define MOEOFFLOAD_HD inline
#endif

namespace moeoffload {

enum class DType : uint8_t { F32 = 1, BF16 = 2, F16 = 3 };

inline bool dtype_is_valid(uint32_t code) { return code >= 1 && code <= 3; }
inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) {
  return t == DType::F32 ? "float32" : t == DType::BF16 ? "bfloat16" : "float16";
}

MOEOFFLOAD_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
MOEOFFLOAD_HD float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// float -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN: rounding the GPU's
// 0x7FFFFFFF would carry into the sign and give -0.
MOEOFFLOAD_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
MOEOFFLOAD_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// float -> IEEE half, round to nearest even, overflow to Inf, subnormals exact.
MOEOFFLOAD_HD uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to Inf
  if (ax < 0x38800000u) {                                               // below 2^-14: subnormal half
    if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);          // <= 2^-25 rounds to 0 (tie to even)
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t h = r >> 13;
  uint32_t rem = r & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

MOEOFFLOAD_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    // subnormal or zero: m * 2^-24, exact in float
    float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// Raw element bits (zero-extended) -> float.
MOEOFFLOAD_HD float raw_to_f32(uint32_t raw, DType t) {
  return t == DType::F32 ? bits_f32(raw) : t == DType::BF16 ? bf16_to_f32(static_cast<uint16_t>(raw))
                                                            : f16_to_f32(static_cast<uint16_t>(raw));
}

// The bits container of each stored dtype and the float -> stored conversion
// (RNE) that both decoders use, so their outputs agree bit for bit.
template <DType T>
struct Stored;
template <>
struct Stored<DType::F32> {
  using type = uint32_t;
  static MOEOFFLOAD_HD uint32_t from_f32(float v) { return f32_bits(v); }
  static MOEOFFLOAD_HD float to_f32(uint32_t v) { return bits_f32(v); }
};
template <>
struct Stored<DType::BF16> {
  using type = uint16_t;
  static MOEOFFLOAD_HD uint16_t from_f32(float v) { return f32_to_bf16(v); }
  static MOEOFFLOAD_HD float to_f32(uint16_t v) { return bf16_to_f32(v); }
};
template <>
struct Stored<DType::F16> {
  using type = uint16_t;
  static MOEOFFLOAD_HD uint16_t from_f32(float v) { return f32_to_f16(v); }
  static MOEOFFLOAD_HD float to_f32(uint16_t v) { return f16_to_f32(v); }
};

// float -> raw bits of the stored dtype (RNE), zero-extended.
MOEOFFLOAD_HD uint32_t stored_bits(float v, DType t) {
  return t == DType::F32 ? f32_bits(v) : t == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

// v rounded to dtype t (RNE), as float: what storing it in t keeps.
MOEOFFLOAD_HD float rounded_to(float v, DType t) { return t == DType::F32 ? v : raw_to_f32(stored_bits(v, t), t); }

}  // namespace moeoffload
