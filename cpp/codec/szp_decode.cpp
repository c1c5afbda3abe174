// szp CPU decoder: the reference for the CUDA kernel and the cpu backend's
// kernel. Segments are decoded in parallel; within a block, the bit-plane loop
// and the sign/scale/convert loop have fixed trip counts (32) so the compiler
// vectorises them. On x86-64 with AVX2 an intrinsics path decodes blocks of
// width <= 8; MOEOFFLOAD_DISABLE_AVX2=1 forces the portable path (tests compare the two).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "moeoffload/parallel.h"
#include "moeoffload/szp.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOEOFFLOAD_X86 1
#define MOEOFFLOAD_AVX2 __attribute__((target("avx2,f16c")))
#else
#define MOEOFFLOAD_X86 0
#define MOEOFFLOAD_AVX2
#endif

namespace moeoffload {

namespace {

// Portable block decoder (the reference): bit planes -> magnitudes -> signed
// q -> float(q) * step -> stored dtype. Fixed trip counts so it vectorises.
template <DType T>
inline void decode_block_generic(const uint32_t* words, uint32_t bits, float step, typename Stored<T>::type* vals) {
  uint32_t mag[kSzpBlock] = {};
  for (uint32_t b = 0; b < bits; ++b) {
    const uint32_t w = words[1 + b];
    for (uint32_t i = 0; i < kSzpBlock; ++i) mag[i] |= ((w >> i) & 1u) << b;
  }
  const uint32_t sign = words[0];
  for (uint32_t i = 0; i < kSzpBlock; ++i) {
    const int32_t neg = -static_cast<int32_t>((sign >> i) & 1u);  // 0 or -1
    const int32_t q = (static_cast<int32_t>(mag[i]) ^ neg) - neg;
    vals[i] = Stored<T>::from_f32(static_cast<float>(q) * step);
  }
}

#if MOEOFFLOAD_X86
// AVX2 block decoder for widths <= 8 (nearly every block of real weights): one
// 32-byte register holds the 32 magnitudes; a plane word is spread to one bit
// per byte with a byte shuffle and a compare. Same arithmetic as the generic
// path (F16C's round-to-nearest-even is IEEE, as is f32_to_f16), checked equal
// by the tests.
MOEOFFLOAD_AVX2 inline __m256i spread_bits(uint32_t w) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(w)), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);  // 0xFF where the bit is set
}

inline uint32_t load_word(const uint8_t* p) {
  uint32_t w;
  memcpy(&w, p, 4);
  return w;
}

// Widens 8 magnitude bytes and 8 sign bytes (0x00/0xFF) to q, scales, converts, stores 8 values.
template <DType T>
MOEOFFLOAD_AVX2 inline void store8(__m128i mag8, __m128i neg8, __m256 vstep, typename Stored<T>::type* vals) {
  const __m256i m = _mm256_cvtepu8_epi32(mag8);
  const __m256i n = _mm256_cvtepi8_epi32(neg8);
  const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(m, n), n)), vstep);
  if constexpr (T == DType::F32) {
    _mm256_storeu_ps(reinterpret_cast<float*>(vals), v);
  } else if constexpr (T == DType::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(vals), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(vals),
                     _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
  }
}

template <DType T>
MOEOFFLOAD_AVX2 inline void decode_block_avx2(const uint8_t* p, uint32_t bits, float step,
                                              typename Stored<T>::type* vals) {
  __m256i mag = _mm256_setzero_si256();
  for (uint32_t b = 0; b < bits; ++b)
    mag = _mm256_or_si256(mag, _mm256_and_si256(spread_bits(load_word(p + 4 + 4 * b)),
                                                 _mm256_set1_epi8(static_cast<char>(1u << b))));
  const __m256i neg = spread_bits(load_word(p));
  const __m256 vstep = _mm256_set1_ps(step);
  const __m128i mlo = _mm256_castsi256_si128(mag), mhi = _mm256_extracti128_si256(mag, 1);
  const __m128i nlo = _mm256_castsi256_si128(neg), nhi = _mm256_extracti128_si256(neg, 1);
  store8<T>(mlo, nlo, vstep, vals);
  store8<T>(_mm_srli_si128(mlo, 8), _mm_srli_si128(nlo, 8), vstep, vals + 8);
  store8<T>(mhi, nhi, vstep, vals + 16);
  store8<T>(_mm_srli_si128(mhi, 8), _mm_srli_si128(nhi, 8), vstep, vals + 24);
}
#endif

template <DType T, bool kAvx2>
void decode_segments_impl(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1, typename Stored<T>::type* out) {
  using O = typename Stored<T>::type;
  const uint8_t* payload = buf + v.payload_at;
  const float step = v.step;
  for (uint64_t s = s0; s < s1; ++s) {
    uint64_t seg_at;
    memcpy(&seg_at, buf + v.seg_offsets_at + 8 * s, 8);
    const uint8_t* widths = payload + seg_at;
    const uint64_t first = s * v.segment_len;
    const uint64_t len = std::min(v.segment_len, v.numel - first);
    const uint64_t nblocks = szp_blocks_in(len);
    const uint8_t* p = widths + szp_widths_bytes(nblocks);
    O* dst = out + first;
    for (uint64_t k = 0; k < nblocks; ++k, dst += kSzpBlock) {
      const uint32_t bits = widths[k];
      const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - k * kSzpBlock));
      if (bits == 0) {
        memset(dst, 0, cnt * sizeof(O));
        continue;
      }
      O vals[kSzpBlock];
      O* target = cnt == kSzpBlock ? dst : vals;
#if MOEOFFLOAD_X86
      if (kAvx2 && bits <= 8) {
        decode_block_avx2<T>(p, bits, step, target);
      } else
#endif
      {
        uint32_t words[1 + kSzpMaxBits];
        memcpy(words, p, 4 * (bits + 1));
        decode_block_generic<T>(words, bits, step, target);
      }
      p += szp_block_bytes(bits);
      if (cnt != kSzpBlock) memcpy(dst, vals, cnt * sizeof(O));
    }
  }
}

#if MOEOFFLOAD_X86
template <DType T>
MOEOFFLOAD_AVX2 void decode_segments_avx2(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1,
                                          typename Stored<T>::type* out) {
  decode_segments_impl<T, true>(buf, v, s0, s1, out);
}
#endif

bool use_avx2() {
#if MOEOFFLOAD_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         std::getenv("MOEOFFLOAD_DISABLE_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

template <DType T>
void decode_segments(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1, typename Stored<T>::type* out) {
#if MOEOFFLOAD_X86
  if (use_avx2()) return decode_segments_avx2<T>(buf, v, s0, s1, out);
#endif
  decode_segments_impl<T, false>(buf, v, s0, s1, out);
}

template <DType T>
void decode_all(const uint8_t* buf, const SzpView& v, void* out_ptr) {
  using O = typename Stored<T>::type;
  O* out = static_cast<O*>(out_ptr);
  if (v.numel == 0) return;
  // >= 128K values a chunk: waking a worker costs tens of microseconds
  const uint64_t grain = std::max<uint64_t>(1, (1 << 17) / v.segment_len);
  parallel_for(v.n_segments, grain, [&](uint64_t s0, uint64_t s1) {
    decode_segments<T>(buf, v, s0, s1, out);
    if (!v.n_exceptions) return;
    for (uint64_t s = s0; s < s1; ++s) {  // patch the values kept exactly
      uint64_t a, b;
      memcpy(&a, buf + v.exc_offsets_at + 8 * s, 8);
      memcpy(&b, buf + v.exc_offsets_at + 8 * (s + 1), 8);
      for (uint64_t e = a; e < b; ++e) {
        uint32_t entry[2];
        memcpy(entry, buf + v.exc_entries_at + 8 * e, 8);
        out[s * v.segment_len + entry[0]] = static_cast<O>(entry[1]);
      }
    }
  });
}

}  // namespace

void szp_decode_cpu(const uint8_t* buf, const SzpView& v, void* out) {
  switch (v.dtype) {
    case DType::F32: return decode_all<DType::F32>(buf, v, out);
    case DType::BF16: return decode_all<DType::BF16>(buf, v, out);
    case DType::F16: return decode_all<DType::F16>(buf, v, out);
  }
}

}  // namespace moeoffload
