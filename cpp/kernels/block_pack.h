// Packing one szp block (the inverse of block_unpack.h): 32 int32 values as w-bit two's-complement
// fields, LSB first, in exactly w u32 words; for the szpe CPU transcoder (szpe_decode.cpp), which
// writes an szp block for every 32 values it decodes. Two paths, each a struct with one function,
// block(q, cnt, w, out): the values q[0 .. cnt) (the rest 0) packed into the 4w bytes at out (any
// alignment), nothing else written.
//
//   Portable: szp_pack_block, the reference (a 64-bit accumulator, a branch a value).
//   Avx512 (full blocks; a short one takes the portable path): the values narrowed to the smallest
//     lane that holds w bits (vpmovdb or vpmovdw: 8 bits for w <= 8, 16 for w <= 16, else 32), so a
//     u64 holds 8, 4 or 2 of them; one pext a u64 takes the low w bits of each lane, giving a chunk
//     of 8w, 4w or 2w consecutive bits of the block; 4, 8 or 16 chunks are ORed into place and two
//     masked stores write the w words. About 4x fewer operations than the portable loop at w <= 8.
//     pext is fast on every AVX-512 CPU (on AMD before Zen 3 it is microcoded, so the AVX2 path
//     keeps the portable pack).
//
// tests/test_szpe.py transcodes with every path this CPU has and compares the bytes.
#pragma once
#include <cstdint>
#include <cstring>

#include "block_unpack.h"  // MOEOFFLOAD_X86, the target attributes (AVX-512's includes BMI2), immintrin.h
#include "moeoffload/szp_block.h"

namespace moeoffload {
namespace pack {

struct Portable {
  static void block(const int32_t* q, uint32_t cnt, uint32_t w, uint8_t* out) {
    uint32_t words[kSzpMaxWidth];
    szp_pack_block(q, cnt, w, words);
    for (uint32_t i = 0; i < w; ++i) memcpy(out + 4 * i, &words[i], 4);  // (a memcpy of w * 4 bytes is a call)
  }
};

#if MOEOFFLOAD_X86
struct Avx512 {
  MOEOFFLOAD_TARGET_AVX512 static inline void full(const int32_t* q, uint32_t w, uint8_t* out) {
    const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 16);
    alignas(64) uint64_t lanes[16];  // the values narrowed, 8, 4 or 2 to a u64
    const uint64_t m = (1ull << w) - 1;
    uint32_t n_chunks;
    uint64_t lane_mask;  // the low w bits of each lane
    if (w <= 8) {
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), _mm512_cvtepi32_epi8(q0));
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes + 2), _mm512_cvtepi32_epi8(q1));
      n_chunks = 4;
      lane_mask = m * 0x0101010101010101ull;
    } else if (w <= 16) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm512_cvtepi32_epi16(q0));
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), _mm512_cvtepi32_epi16(q1));
      n_chunks = 8;
      lane_mask = m * 0x0001000100010001ull;
    } else {
      _mm512_store_si512(lanes, q0);
      _mm512_store_si512(lanes + 8, q1);
      n_chunks = 16;
      lane_mask = m | (m << 32);
    }
    const uint32_t chunk_bits = 32 * w / n_chunks;  // 8w, 4w or 2w: at most 64
    alignas(64) uint64_t words[16] = {};            // 32 * 25 bits at most: 12.5 u64
    for (uint32_t c = 0; c < n_chunks; ++c) {
      const uint64_t x = _pext_u64(lanes[c], lane_mask);
      const uint32_t at = c * chunk_bits, i = at >> 6, sh = at & 63;
      words[i] |= x << sh;
      words[i + 1] |= (x >> 1) >> (63 - sh);  // the bits past the u64 (none when sh is 0)
    }
    __mmask16 m0, m1;
    unpack::word_masks(w, m0, m1);
    _mm512_mask_storeu_epi32(out, m0, _mm512_load_si512(words));
    _mm512_mask_storeu_epi32(out + 64, m1, _mm512_load_si512(words + 8));
  }
  MOEOFFLOAD_TARGET_AVX512 static inline void block(const int32_t* q, uint32_t cnt, uint32_t w, uint8_t* out) {
    if (cnt == kSzpBlock) full(q, w, out);
    else Portable::block(q, cnt, w, out);
  }
};
#endif

}  // namespace pack
}  // namespace moeoffload
