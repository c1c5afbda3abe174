// Vectorised unpacking of one szp block (the layout of szp_block.h: 32
// two's-complement fields of w bits, LSB first, in w u32 words) into 32 int32
// lanes, for the CPU kernels. Three paths, picked at run time (cpu_isa.h):
//
//   AVX-512: the block's words are two zmm registers (masked loads, so nothing
//     past the block is read); per 16 values one vpermi2d fetches the word
//     holding each field's top bit (H) and one the word before it (L), then
//     (H << (31 - t)) | (L >> (t + 1)) puts the field in the top bits (t is the
//     top bit's position in H; shifts of 32 give 0) and an arithmetic shift by
//     32 - w sign-extends it. Six vector operations per 16 values, any width.
//   AVX2: the same per 8 values, from the (at most 8) words those 8 fields span.
//   portable: szp_field, the reference, per value.
//
// The index and shift vectors depend only on (w, i) and come from tables.
// Functions carry their target attribute so the file builds without -mavx*
// and only runs where cpu_isa() chose it. Tests compare every path with
// szp_field on every width.
#pragma once
#include <cstdint>
#include <cstring>

#include "moeoffload/szp_block.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEOFFLOAD_X86 1
#define MOEOFFLOAD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
#define MOEOFFLOAD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MOEOFFLOAD_X86 0
#endif

namespace moeoffload {
namespace unpack {

// Per width w (index 0 unused) and value i: the word holding the field's top
// bit (hi), the word before it (lo, clamped at 0: its bits end up below the
// field and are shifted out), and the two shift counts.
struct Tables {
  alignas(64) int32_t hi[kSzpMaxWidth + 1][kSzpBlock];
  alignas(64) int32_t lo[kSzpMaxWidth + 1][kSzpBlock];
  alignas(64) int32_t left[kSzpMaxWidth + 1][kSzpBlock];   // 31 - t
  alignas(64) int32_t right[kSzpMaxWidth + 1][kSzpBlock];  // t + 1
  // AVX2: per group g of 8 values, the same relative to word base8[w][g].
  int32_t base8[kSzpMaxWidth + 1][4];
  alignas(32) int32_t hi8[kSzpMaxWidth + 1][kSzpBlock];
  alignas(32) int32_t lo8[kSzpMaxWidth + 1][kSzpBlock];
  // AVX2, widths 1..8: byte shuffle and multiplier that put field j of a
  // group of 8 top-aligned into 16-bit lane j.
  alignas(16) uint8_t shuf16[9][16];
  alignas(16) uint16_t mul16[9][8];
  Tables() {
    memset(this, 0, sizeof *this);
    for (uint32_t w = 1; w <= kSzpMaxWidth; ++w)
      for (uint32_t i = 0; i < kSzpBlock; ++i) {
        const uint32_t top = i * w + w - 1;
        const int32_t h = static_cast<int32_t>(top >> 5), t = static_cast<int32_t>(top & 31);
        hi[w][i] = h;
        lo[w][i] = h > 0 ? h - 1 : 0;
        left[w][i] = 31 - t;
        right[w][i] = t + 1;
        const uint32_t g = i / 8;
        base8[w][g] = static_cast<int32_t>((g * 8 * w) >> 5);
        hi8[w][i] = h - base8[w][g];
        lo8[w][i] = h - base8[w][g] > 0 ? h - base8[w][g] - 1 : 0;
      }
    for (uint32_t w = 1; w <= 8; ++w)
      for (uint32_t j = 0; j < 8; ++j) {
        const uint32_t bit = j * w, b = bit >> 3, sh = bit & 7;
        shuf16[w][2 * j] = static_cast<uint8_t>(b);
        shuf16[w][2 * j + 1] = static_cast<uint8_t>(sh + w > 8 ? b + 1 : 0x80);
        mul16[w][j] = static_cast<uint16_t>(1u << (16 - sh - w));
      }
  }
};
extern const Tables kTables;

// Portable: 32 values as int32.
inline void portable(const uint8_t* p, uint32_t w, int32_t q[kSzpBlock]) {
  uint32_t words[kSzpMaxWidth];
  memcpy(words, p, szp_block_bytes(w));
  szp_unpack_block(words, w, q);
}

#if MOEOFFLOAD_X86
// A block's w words as two registers of 16: the lanes of each that hold one (block_pack.h too).
inline void word_masks(uint32_t w, __mmask16& m0, __mmask16& m1) {
  m0 = static_cast<__mmask16>(w >= 16 ? 0xFFFFu : (1u << w) - 1u);
  m1 = static_cast<__mmask16>(w > 16 ? (1u << (w - 16)) - 1u : 0u);
}

// AVX-512: values 0..15 in q0, 16..31 in q1.
MOEOFFLOAD_TARGET_AVX512 inline void avx512(const uint8_t* p, uint32_t w, __m512i& q0, __m512i& q1) {
  const int32_t* src = reinterpret_cast<const int32_t*>(p);
  __mmask16 m0, m1;
  word_masks(w, m0, m1);
  const __m512i a = _mm512_maskz_loadu_epi32(m0, src);
  const __m512i b = _mm512_maskz_loadu_epi32(m1, src + 16);
  const __m128i sext = _mm_cvtsi32_si128(static_cast<int>(32 - w));
  const Tables& t = kTables;
  __m512i f[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i hw = _mm512_permutex2var_epi32(a, _mm512_load_si512(t.hi[w] + 16 * h), b);
    const __m512i lw = _mm512_permutex2var_epi32(a, _mm512_load_si512(t.lo[w] + 16 * h), b);
    const __m512i top = _mm512_or_si512(_mm512_sllv_epi32(hw, _mm512_load_si512(t.left[w] + 16 * h)),
                                        _mm512_srlv_epi32(lw, _mm512_load_si512(t.right[w] + 16 * h)));
    f[h] = _mm512_sra_epi32(top, sext);
  }
  q0 = f[0];
  q1 = f[1];
}

// AVX2: values 8g..8g+7 in q[g].
MOEOFFLOAD_TARGET_AVX2 inline void avx2(const uint8_t* p, uint32_t w, __m256i q[4]) {
  const int32_t* src = reinterpret_cast<const int32_t*>(p);
  const __m128i sext = _mm_cvtsi32_si128(static_cast<int>(32 - w));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const Tables& t = kTables;
  for (int g = 0; g < 4; ++g) {
    const int32_t base = t.base8[w][g];
    // words base .. base+7 that lie inside the block
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(w) - base), lane);
    const __m256i v = _mm256_maskload_epi32(src + base, mask);
    const __m256i hw = _mm256_permutevar8x32_epi32(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.hi8[w] + 8 * g)));
    const __m256i lw = _mm256_permutevar8x32_epi32(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.lo8[w] + 8 * g)));
    const __m256i top =
        _mm256_or_si256(_mm256_sllv_epi32(hw, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.left[w] + 8 * g))),
                        _mm256_srlv_epi32(lw, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.right[w] + 8 * g))));
    q[g] = _mm256_sra_epi32(top, sext);
  }
}


// AVX2, widths 1..8: the 8 fields of group g (values 8g..8g+7) fill exactly
// w bytes starting at byte g*w, so one in-lane byte shuffle gathers each
// field's (at most two) bytes into a 16-bit lane, a multiply by 2^(16-s-w)
// top-aligns it and an arithmetic shift by 16 - w sign-extends it: two groups
// per register, 3 operations each pair. Reads 16 bytes at p + g*w: the caller
// checks that p + 40 lies inside the buffer.
MOEOFFLOAD_TARGET_AVX2 inline void avx2_narrow(const uint8_t* p, uint32_t w, __m256i q[4]) {
  const Tables& t = kTables;
  const __m256i shuf = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t.shuf16[w])));
  const __m256i mul = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t.mul16[w])));
  const __m128i sext = _mm_cvtsi32_si128(static_cast<int>(16 - w));
  for (int pair = 0; pair < 2; ++pair) {
    const __m128i g0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (2 * pair) * w));
    const __m128i g1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (2 * pair + 1) * w));
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(g0), g1, 1);
    const __m256i v = _mm256_sra_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, shuf), mul), sext);
    q[2 * pair] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
    q[2 * pair + 1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1));
  }
}
#endif

}  // namespace unpack
}  // namespace moeoffload
