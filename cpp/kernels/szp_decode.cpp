// szp CPU decoder: the cpu backend's decode and the reference the CUDA
// decoder is tested against (bit for bit). Segments are decoded in parallel;
// each block is unpacked by the path cpu_isa() picked (block_unpack.h), scaled
// by the step with one float32 multiply and rounded to the stored dtype with
// the integer RNE of dtype.h (F16C's and the AVX-512 conversion's rounding is
// the same IEEE RNE; the tests compare every path).
#include <algorithm>
#include <cstring>

#include "../codec/szp_layout.h"
#include "block_unpack.h"
#include "moeoffload/cpu_isa.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szp.h"

namespace moeoffload {

namespace {

template <DType T>
struct PortableBlock {
  using O = typename Stored<T>::type;
  static void decode(const uint8_t* p, uint32_t w, float step, O* vals, const uint8_t*) {
    int32_t q[kSzpBlock];
    unpack::portable(p, w, q);
    for (uint32_t i = 0; i < kSzpBlock; ++i) vals[i] = szp_value<T>(q[i], step);
  }
};

#if MOEOFFLOAD_X86
template <DType T>
struct Avx512Block {
  using O = typename Stored<T>::type;
  MOEOFFLOAD_TARGET_AVX512 static inline void store16(__m512i q, __m512 vstep, O* vals) {
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), vstep);
    if constexpr (T == DType::F32) {
      _mm512_storeu_ps(reinterpret_cast<float*>(vals), v);
    } else if constexpr (T == DType::F16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vals), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {  // bf16, round to nearest even (values are finite)
      __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vals), _mm512_cvtepi32_epi16(u));
    }
  }
  MOEOFFLOAD_TARGET_AVX512 static inline void decode(const uint8_t* p, uint32_t w, float step, O* vals,
                                                     const uint8_t*) {
    __m512i q0, q1;
    unpack::avx512(p, w, q0, q1);
    const __m512 vstep = _mm512_set1_ps(step);
    store16(q0, vstep, vals);
    store16(q1, vstep, vals + 16);
  }
};

template <DType T>
struct Avx2Block {
  using O = typename Stored<T>::type;
  MOEOFFLOAD_TARGET_AVX2 static inline void store8(__m256i q, __m256 vstep, O* vals) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), vstep);
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
  MOEOFFLOAD_TARGET_AVX2 static inline void decode(const uint8_t* p, uint32_t w, float step, O* vals,
                                                   const uint8_t* end) {
    __m256i q[4];
    if (w <= 8 && p + 40 <= end) unpack::avx2_narrow(p, w, q);
    else unpack::avx2(p, w, q);
    const __m256 vstep = _mm256_set1_ps(step);
    for (int g = 0; g < 4; ++g) store8(q[g], vstep, vals + 8 * g);
  }
};
#endif

// Decodes segments [s0, s1) with the block decoder B (inlined into the
// caller, which carries B's target attribute).
template <DType T, class B>
inline __attribute__((always_inline)) void decode_segments(const uint8_t* buf, const SzpView& v, uint64_t s0,
                                                           uint64_t s1, typename Stored<T>::type* out) {
  using O = typename Stored<T>::type;
  const uint8_t* payload = buf + v.payload_at;
  const uint8_t* end = buf + v.total_bytes;
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
      const uint32_t w = widths[k];
      const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - k * kSzpBlock));
      if (w == 0) {
        memset(dst, 0, cnt * sizeof(O));
        continue;
      }
      if (cnt == kSzpBlock) {
        B::decode(p, w, v.step, dst, end);
      } else {
        O vals[kSzpBlock];
        B::decode(p, w, v.step, vals, end);
        memcpy(dst, vals, cnt * sizeof(O));
      }
      p += szp_block_bytes(w);
    }
  }
}

template <DType T>
void segments_portable(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1, typename Stored<T>::type* out) {
  decode_segments<T, PortableBlock<T>>(buf, v, s0, s1, out);
}
#if MOEOFFLOAD_X86
template <DType T>
MOEOFFLOAD_TARGET_AVX512 void segments_avx512(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1,
                                              typename Stored<T>::type* out) {
  decode_segments<T, Avx512Block<T>>(buf, v, s0, s1, out);
}
template <DType T>
MOEOFFLOAD_TARGET_AVX2 void segments_avx2(const uint8_t* buf, const SzpView& v, uint64_t s0, uint64_t s1,
                                          typename Stored<T>::type* out) {
  decode_segments<T, Avx2Block<T>>(buf, v, s0, s1, out);
}
#endif

template <DType T>
void decode_all(const uint8_t* buf, const SzpView& v, void* out_ptr) {
  using O = typename Stored<T>::type;
  O* out = static_cast<O*>(out_ptr);
  if (v.numel == 0) return;
  const CpuIsa isa = cpu_isa();
  // >= 128K values a chunk: waking a worker costs tens of microseconds
  const uint64_t grain = std::max<uint64_t>(1, (1 << 17) / v.segment_len);
  parallel_for(v.n_segments, grain, [&](uint64_t s0, uint64_t s1) {
#if MOEOFFLOAD_X86
    if (isa == CpuIsa::Avx512) segments_avx512<T>(buf, v, s0, s1, out);
    else if (isa == CpuIsa::Avx2) segments_avx2<T>(buf, v, s0, s1, out);
    else
#endif
      segments_portable<T>(buf, v, s0, s1, out);
    if (!v.n_exceptions) return;
    for (uint64_t s = s0; s < s1; ++s)  // patch the values kept exactly
      szp_layout::for_each_exception(buf + v.exc_offsets_at, buf + v.exc_entries_at, s,
                                     [&](uint32_t pos, uint32_t raw) { out[s * v.segment_len + pos] = static_cast<O>(raw); });
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
