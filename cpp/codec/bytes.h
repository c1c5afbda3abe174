// Unaligned little-endian loads and stores of the codec formats, and size arithmetic that reports
// overflow instead of wrapping. Internal to the codecs (the host is little-endian: cpu_isa.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

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

// a + b and a * b; false on overflow.
inline bool add(uint64_t a, uint64_t b, uint64_t& out) {
  if (b > UINT64_MAX - a) return false;
  out = a + b;
  return true;
}
inline bool mul(uint64_t a, uint64_t b, uint64_t& out) {
  if (a && b > UINT64_MAX / a) return false;
  out = a * b;
  return true;
}

}  // namespace moeoffload::bytes
