// The decoding of one szp block, written once: host + device functions shared
// by the CPU reference decoder, the CUDA decoder and every fused kernel.
//
// A block (docs/format.md, szp version 2) holds 32 quantised values q as
// w-bit two's-complement fields packed LSB first into w little-endian u32
// words: field i occupies bits [i*w, i*w + w) of the block's bit string, so it
// lies in word (i*w) >> 5, and spills into the next word when it crosses a
// word boundary. w = 0 means all 32 values are 0 and the block stores nothing.
// The value is float(q) * step (one float32 multiply), rounded to the stored
// dtype by the decoder; the fused kernels multiply with float(q) and apply
// `step` once per output, so they compute with q * step before that rounding.
// The encoder keeps both within the bound.
//
// Vectorised CPU unpackers (cpp/kernels/block_unpack.h) are tested equal to
// szp_field on every width.
#pragma once
#include <cstdint>

#include "moeoffload/dtype.h"

namespace moeoffload {

constexpr uint32_t kSzpBlock = 32;     // values per block
constexpr uint32_t kSzpMaxWidth = 25;  // |q| <= 2^24 - 1: float(q) is exact, fields fit 25 bits

MOEOFFLOAD_HD uint32_t szp_block_words(uint32_t width) { return width; }
MOEOFFLOAD_HD uint32_t szp_block_bytes(uint32_t width) { return 4u * width; }

// Field i (0..31) of a block of width w (1..25), sign-extended.
MOEOFFLOAD_HD int32_t szp_field(const uint32_t* words, uint32_t w, uint32_t i) {
  const uint32_t bit = i * w, k = bit >> 5, s = bit & 31u;
  uint64_t v = words[k];
  if (s + w > 32u) v |= static_cast<uint64_t>(words[k + 1]) << 32;
  const uint32_t field = static_cast<uint32_t>(v >> s) << (32u - w);  // field in the top bits
  return static_cast<int32_t>(field) >> (32 - static_cast<int32_t>(w));
}

// All 32 values of a block (width 0 gives zeros).
MOEOFFLOAD_HD void szp_unpack_block(const uint32_t* words, uint32_t w, int32_t q[kSzpBlock]) {
  for (uint32_t i = 0; i < kSzpBlock; ++i) q[i] = w ? szp_field(words, w, i) : 0;
}

// The decoded value of q in the stored dtype: float(q) * step, rounded (RNE).
template <DType T>
MOEOFFLOAD_HD typename Stored<T>::type szp_value(int32_t q, float step) {
#if defined(__CUDA_ARCH__)
  return Stored<T>::from_f32(__fmul_rn(__int2float_rn(q), step));
#else
  return Stored<T>::from_f32(static_cast<float>(q) * step);
#endif
}

// The width a block of values needs: the fewest bits of two's complement that
// hold every q (0 when all are 0). qmin <= 0 <= qmax (callers start both at 0):
// w - 1 is the bit length of max(qmax, -1 - qmin), since -2^(w-1) <= qmin is
// -1 - qmin < 2^(w-1). No loop: a GPU warp computes it once a block.
MOEOFFLOAD_HD uint32_t szp_width_for(int32_t qmin, int32_t qmax) {
  if (qmin == 0 && qmax == 0) return 0;
  const uint32_t m = static_cast<uint32_t>(qmax > -1 - qmin ? qmax : -1 - qmin);
#if defined(__CUDA_ARCH__)
  return m ? 33u - static_cast<uint32_t>(__clz(static_cast<int>(m))) : 1u;
#else
  return m ? 33u - static_cast<uint32_t>(__builtin_clz(m)) : 1u;
#endif
}

// The width of a block's cnt values (szp_width_for of their min and max).
MOEOFFLOAD_HD uint32_t szp_width_of(const int32_t* q, uint32_t cnt) {
  int32_t qmin = 0, qmax = 0;
  for (uint32_t i = 0; i < cnt; ++i) {
    qmin = q[i] < qmin ? q[i] : qmin;
    qmax = q[i] > qmax ? q[i] : qmax;
  }
  return szp_width_for(qmin, qmax);
}

// Packs a block's values (cnt <= 32 of them; the missing ones are 0) as w-bit fields (1 <= w <= 25)
// into exactly w words at out: the layout szp_field reads. Written once for the szp encoder and the
// szpe transcoders (CPU and CUDA), so both write the same bytes. A 64-bit accumulator, no array
// indexed by a computed word number: registers on a GPU.
MOEOFFLOAD_HD void szp_pack_block(const int32_t* q, uint32_t cnt, uint32_t w, uint32_t* out) {
  const uint32_t mask = (1u << w) - 1u;
  uint64_t acc = 0;
  uint32_t bits = 0, k = 0;
  for (uint32_t i = 0; i < kSzpBlock; ++i) {
    const uint32_t field = i < cnt ? static_cast<uint32_t>(q[i]) & mask : 0u;
    acc |= static_cast<uint64_t>(field) << bits;
    bits += w;
    if (bits >= 32) {  // 32 * w bits in all: exactly w words
      out[k++] = static_cast<uint32_t>(acc);
      acc >>= 32;
      bits -= 32;
    }
  }
}

}  // namespace moeoffload
