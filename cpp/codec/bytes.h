// Unaligned little-endian loads and stores of the codec formats, the CorruptData error their
// parsers and decoders raise, and size arithmetic that raises it on overflow instead of wrapping.
// Internal to the codecs (the host is little-endian: cpu_isa.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moeoffload/errors.h"

namespace moeoffload::bytes {

template <typename T>
T load(const uint8_t* p) {
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
void store(std::vector<uint8_t>& buf, uint64_t at, T v) {
  memcpy(buf.data() + at, &v, sizeof(T));
}

// Error(CorruptData) for a buffer of `format` ("szp", "szpe"), saying why and what to do.
[[noreturn]] inline void corrupt(const char* format, const std::string& why) {
  throw Error(ErrorKind::CorruptData,
              std::string(format) + " buffer is corrupt or truncated: " + why +
                  ". Re-create it from the original weights (moeoffload.codec.compress) or re-copy the file.");
}

// a + b and a * b, or corrupt() on overflow.
inline uint64_t add(uint64_t a, uint64_t b, const char* format) {
  if (b > UINT64_MAX - a) corrupt(format, "size overflow");
  return a + b;
}
inline uint64_t mul(uint64_t a, uint64_t b, const char* format) {
  if (a && b > UINT64_MAX / a) corrupt(format, "size overflow");
  return a * b;
}

// The number of values of a shape, or corrupt() when its non-zero dimensions multiply past 2^63 - 1
// (the sizes and strides of torch and NumPy are signed 64-bit: such a shape, even with a zero
// dimension, makes no tensor).
inline uint64_t numel_of(const uint64_t* shape, uint32_t ndim, const char* format) {
  uint64_t numel = 1, nonzero = 1;
  for (uint32_t i = 0; i < ndim; ++i) {
    numel *= shape[i];  // 0 once any dimension is
    if (shape[i]) nonzero = mul(nonzero, shape[i], format);
    if (nonzero > static_cast<uint64_t>(INT64_MAX)) corrupt(format, "a shape beyond 2^63 - 1 values");
  }
  return numel;
}

// The smallest step an encoder writes: float32's smallest normal number.
constexpr float kMinStep = std::numeric_limits<float>::min();

// The bound and step of a header (szp's, szpe's), checked for consistency: eb positive and finite,
// step a normal float32 no larger than 2 eb (the encoder picks the largest float <= 2 eb, or a little
// less: szp_encode.cpp). A step of 1e30 under a claimed eb of 1e-4 is refused; the q values
// themselves are data, which only the CRC guards.
inline void check_bound_and_step(double eb, float step, const char* format) {
  if (!(std::isfinite(eb) && eb > 0)) corrupt(format, "error bound is not a positive finite number");
  if (!(std::isfinite(step) && step >= kMinStep)) corrupt(format, "step is not a positive normal number");
  if (static_cast<double>(step) > 2.0 * eb) corrupt(format, "step is larger than twice the error bound");
}

}  // namespace moeoffload::bytes
