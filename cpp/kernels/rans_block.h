// One rANS step of an szpe stream's 32 states (rans.h): the symbols of a whole szp block, and the
// renormalisation words read in lane order, for the CPU decoders (szpe_decode.cpp). Three paths,
// picked at run time (cpu_isa.h), each a struct with one function:
//
//   step(x, p, table, escape, z): z[j] = the symbol of state j, x[j] its next state, for all 32 j;
//     the words read come from p on, which advances past them. The caller has checked that 64 bytes
//     remain (a word a state at most), so no read needs its own check. Returns whether any symbol is
//     `escape` (rare: the caller then reads the escapes in lane order).
//
//   portable: rans_get and rans_renorm_unchecked per lane, the reference.
//   AVX-512: 16 lanes a register. The slot indexes two gathers: the step (u32) and the symbol (a u32
//     gathered from 3 bytes before the symbol's own, whose top byte it is: the table's step array
//     lies before its symbols, so every byte read is the table's). Then x = f * (x >> 13) + bias,
//     a compare gives the lanes that need a word, and vpexpandd hands the next 16 words (zero-extended)
//     to exactly those lanes, in lane order; the pointer moves by their popcount.
//   AVX2: the same 8 lanes at a time; the expand is a vpermd whose index vector comes from a table
//     of the 256 masks (index i: the number of needing lanes below lane i).
//
// Functions carry their target attribute so the file builds without -mavx* and only runs where
// cpu_isa() chose it. tests/test_szpe.py decodes with every path this CPU has and compares the bits.
#pragma once
#include <cstddef>
#include <cstdint>

#include "block_unpack.h"  // MOEOFFLOAD_X86, the target attributes, immintrin.h
#include "moeoffload/rans.h"

namespace moeoffload {
namespace rans_block {

static_assert(kRansWays == 32, "a step decodes one 32-value szp block");

struct Portable {
  static bool step(uint32_t* x, const uint8_t*& p, const RansTable& t, uint32_t escape, uint32_t* z) {
    uint32_t escapes = 0;
    for (uint32_t j = 0; j < kRansWays; ++j) {
      z[j] = rans_get(x[j], t);
      rans_renorm_unchecked(x[j], p);
      escapes |= z[j] == escape;
    }
    return escapes;
  }
};

#if MOEOFFLOAD_X86
// The symbol of each slot as the top byte of a u32 that ends at it.
inline const uint8_t* symbol_words(const RansTable& t) {
  static_assert(offsetof(RansTable, symbol) >= 3, "the 3 bytes before the symbols are the table's");
  return reinterpret_cast<const uint8_t*>(&t) + offsetof(RansTable, symbol) - 3;
}

struct Avx512 {
  MOEOFFLOAD_TARGET_AVX512 static inline __mmask16 half(uint32_t* x, const uint8_t*& p, const RansTable& t,
                                                       __m512i escape, uint32_t* z) {
    const __m512i state = _mm512_loadu_si512(x);
    const __m512i slot = _mm512_and_si512(state, _mm512_set1_epi32((1 << kRansScaleBits) - 1));
    const __m512i step = _mm512_i32gather_epi32(slot, t.step, 4);
    const __m512i symbol = _mm512_srli_epi32(_mm512_i32gather_epi32(slot, symbol_words(t), 1), 24);
    __m512i next = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_and_si512(step, _mm512_set1_epi32(0xFFFF)), _mm512_srli_epi32(state, kRansScaleBits)),
        _mm512_srli_epi32(step, 16));
    const __mmask16 need = _mm512_cmplt_epu32_mask(next, _mm512_set1_epi32(kRansLow));
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    next = _mm512_mask_or_epi32(next, need, _mm512_slli_epi32(next, 16), _mm512_maskz_expand_epi32(need, words));
    p += 2 * __builtin_popcount(need);
    _mm512_storeu_si512(x, next);
    _mm512_storeu_si512(z, symbol);
    return _mm512_cmpeq_epi32_mask(symbol, escape);
  }
  MOEOFFLOAD_TARGET_AVX512 static inline bool step(uint32_t* x, const uint8_t*& p, const RansTable& t,
                                                   uint32_t escape, uint32_t* z) {
    const __m512i e = _mm512_set1_epi32(static_cast<int>(escape));
    const __mmask16 lo = half(x, p, t, e, z);
    return (lo | half(x + 16, p, t, e, z + 16)) != 0;
  }
};

// For each 8-bit mask of lanes that need a word: lane i takes word popcount(mask & ((1 << i) - 1)).
// Built at compile time (read-only data, no static initialisation order to mind).
struct ExpandIndex8 {
  alignas(32) int32_t index[256][8] = {};
  constexpr ExpandIndex8() {
    for (uint32_t m = 0; m < 256; ++m)
      for (uint32_t i = 0; i < 8; ++i) index[m][i] = __builtin_popcount(m & ((1u << i) - 1));
  }
};
inline constexpr ExpandIndex8 kExpandIndex8{};

struct Avx2 {
  MOEOFFLOAD_TARGET_AVX2 static inline bool step(uint32_t* x, const uint8_t*& p, const RansTable& t, uint32_t escape,
                                                 uint32_t* z) {
    const __m256i e = _mm256_set1_epi32(static_cast<int>(escape));
    __m256i escapes = _mm256_setzero_si256();
    const __m256i slot_mask = _mm256_set1_epi32((1 << kRansScaleBits) - 1);
    const __m256i low_mask = _mm256_set1_epi32(0xFFFF);
    for (uint32_t j = 0; j < kRansWays; j += 8) {
      const __m256i state = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
      const __m256i slot = _mm256_and_si256(state, slot_mask);
      const __m256i step = _mm256_i32gather_epi32(reinterpret_cast<const int*>(t.step), slot, 4);
      const __m256i symbol =
          _mm256_srli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(symbol_words(t)), slot, 1), 24);
      __m256i next = _mm256_add_epi32(
          _mm256_mullo_epi32(_mm256_and_si256(step, low_mask), _mm256_srli_epi32(state, kRansScaleBits)),
          _mm256_srli_epi32(step, 16));
      // x < 2^16: no bit above the low 16
      const __m256i below = _mm256_cmpeq_epi32(_mm256_srli_epi32(next, 16), _mm256_setzero_si256());
      const uint32_t need = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below)));
      const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandIndex8.index[need]));
      const __m256i refill = _mm256_or_si256(_mm256_slli_epi32(next, 16), _mm256_permutevar8x32_epi32(words, index));
      next = _mm256_blendv_epi8(next, refill, below);
      p += 2 * __builtin_popcount(need);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + j), next);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(z + j), symbol);
      escapes = _mm256_or_si256(escapes, _mm256_cmpeq_epi32(symbol, e));
    }
    return !_mm256_testz_si256(escapes, escapes);
  }
};
#endif

}  // namespace rans_block
}  // namespace moeoffload
