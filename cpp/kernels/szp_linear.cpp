// Fused szp linear on the CPU: y[t, r] = step_r · Σ_c x[t, c] · q[r, c] (+ the
// exceptions), read straight from the compressed rows.
//
// Rows are split over the thread pool. A thread walks its row's blocks once
// per tile of tokens: each block is unpacked (block_unpack.h) to 32 int32,
// converted to float, and multiplied into float32 accumulators of every token
// of the tile; at the end of the row the accumulators are summed, scaled by
// the step once, and the row's exceptions (values stored exactly, q = 0 in the
// blocks) are added. The compressed row stays in L1 across the tiles, so for T
// tokens the bytes are read from memory once; the unpack is repeated per tile
// (8 tokens with AVX-512, 4 otherwise), which is why a dense GEMM on a decoded
// matrix wins at large T (ops.py takes that path above the measured crossover).
#include <algorithm>
#include <cstring>
#include <vector>

#include "block_unpack.h"
#include "convert.h"
#include "moeoffload/cpu_isa.h"
#include "moeoffload/cpu_kernels.h"
#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"

namespace moeoffload {

namespace {

struct Rows {
  const uint8_t* buf;
  const SzpView* v;
  const float* x;
  uint64_t ldx;
  uint32_t tokens;
  float* y;
  uint64_t ldy;
  const uint8_t* end;  // one past the buffer: wide loads stay below it
};

inline const uint8_t* row_widths(const Rows& a, uint64_t r) {
  uint64_t at;
  memcpy(&at, a.buf + a.v->seg_offsets_at + 8 * r, 8);
  return a.buf + a.v->payload_at + at;
}

// ---- portable ----
template <int TT>
void row_portable(const Rows& a, uint64_t r, uint32_t t0) {
  const uint8_t* widths = row_widths(a, r);
  const uint64_t nblocks = szp_blocks_in(a.v->segment_len);
  const uint8_t* p = widths + szp_widths_bytes(nblocks);
  float acc[TT][kSzpBlock] = {};
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint32_t w = widths[k];
    if (!w) continue;
    int32_t q[kSzpBlock];
    unpack::portable(p, w, q);
    p += szp_block_bytes(w);
    float qf[kSzpBlock];
    for (uint32_t i = 0; i < kSzpBlock; ++i) qf[i] = static_cast<float>(q[i]);
    for (int t = 0; t < TT; ++t) {
      const float* xs = a.x + (t0 + t) * a.ldx + k * kSzpBlock;
      for (uint32_t i = 0; i < kSzpBlock; ++i) acc[t][i] += qf[i] * xs[i];
    }
  }
  for (int t = 0; t < TT; ++t) {
    float s = 0;
    for (uint32_t i = 0; i < kSzpBlock; ++i) s += acc[t][i];
    a.y[(t0 + t) * a.ldy + r] = s * a.v->step;
  }
}

#if MOEOFFLOAD_X86
// ---- AVX2: 4 groups of 8 values a block ----
MOEOFFLOAD_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int TT>
MOEOFFLOAD_TARGET_AVX2 void row_avx2(const Rows& a, uint64_t r, uint32_t t0) {
  constexpr int NA = TT == 1 ? 4 : TT == 2 ? 2 : 1;  // accumulators per token: hide the FMA latency
  const uint8_t* widths = row_widths(a, r);
  const uint64_t nblocks = szp_blocks_in(a.v->segment_len);
  const uint8_t* p = widths + szp_widths_bytes(nblocks);
  __m256 acc[TT][NA];
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < NA; ++j) acc[t][j] = _mm256_setzero_ps();
  const float* x0 = a.x + static_cast<uint64_t>(t0) * a.ldx;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint32_t w = widths[k];
    if (!w) continue;
    __m256i q[4];
    if (w <= 8 && p + 40 <= a.end) unpack::avx2_narrow(p, w, q);
    else unpack::avx2(p, w, q);
    p += szp_block_bytes(w);
    for (int g = 0; g < 4; ++g) {
      const __m256 qf = _mm256_cvtepi32_ps(q[g]);
      for (int t = 0; t < TT; ++t)
        acc[t][g % NA] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(x0 + t * a.ldx + k * kSzpBlock + 8 * g), acc[t][g % NA]);
    }
  }
  for (int t = 0; t < TT; ++t) {
    __m256 s = acc[t][0];
    for (int j = 1; j < NA; ++j) s = _mm256_add_ps(s, acc[t][j]);
    a.y[(t0 + t) * a.ldy + r] = hsum256(s) * a.v->step;
  }
}

// ---- AVX-512: 2 halves of 16 values a block ----
template <int TT>
MOEOFFLOAD_TARGET_AVX512 void row_avx512(const Rows& a, uint64_t r, uint32_t t0) {
  const uint8_t* widths = row_widths(a, r);
  const uint64_t nblocks = szp_blocks_in(a.v->segment_len);
  const uint8_t* p = widths + szp_widths_bytes(nblocks);
  __m512 acc[TT][2];
  for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const float* x0 = a.x + static_cast<uint64_t>(t0) * a.ldx;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint32_t w = widths[k];
    if (!w) continue;
    __m512i q0, q1;
    unpack::avx512(p, w, q0, q1);
    p += szp_block_bytes(w);
    const __m512 f0 = _mm512_cvtepi32_ps(q0), f1 = _mm512_cvtepi32_ps(q1);
    for (int t = 0; t < TT; ++t) {
      const float* xs = x0 + t * a.ldx + k * kSzpBlock;
      acc[t][0] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xs), acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xs + 16), acc[t][1]);
    }
  }
  for (int t = 0; t < TT; ++t)
    a.y[(t0 + t) * a.ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) * a.v->step;
}
#endif

// Row r for every token, in tiles of at most kMax tokens (powers of two).
template <int kMax, template <int> class Row>
inline void row_all_tokens(const Rows& a, uint64_t r) {
  uint32_t t0 = 0;
  if constexpr (kMax >= 8)
    for (; a.tokens - t0 >= 8; t0 += 8) Row<8>::run(a, r, t0);
  for (; a.tokens - t0 >= 4; t0 += 4) Row<4>::run(a, r, t0);
  for (; a.tokens - t0 >= 2; t0 += 2) Row<2>::run(a, r, t0);
  for (; t0 < a.tokens; ++t0) Row<1>::run(a, r, t0);
}

template <int TT>
struct PortableRow {
  static void run(const Rows& a, uint64_t r, uint32_t t0) { row_portable<TT>(a, r, t0); }
};
#if MOEOFFLOAD_X86
template <int TT>
struct Avx2Row {
  static void run(const Rows& a, uint64_t r, uint32_t t0) { row_avx2<TT>(a, r, t0); }
};
template <int TT>
struct Avx512Row {
  static void run(const Rows& a, uint64_t r, uint32_t t0) { row_avx512<TT>(a, r, t0); }
};
#endif

void add_exceptions(const Rows& a, uint64_t r0, uint64_t r1) {
  const SzpView& v = *a.v;
  if (!v.n_exceptions) return;
  for (uint64_t r = r0; r < r1; ++r) {
    uint64_t e0, e1;
    memcpy(&e0, a.buf + v.exc_offsets_at + 8 * r, 8);
    memcpy(&e1, a.buf + v.exc_offsets_at + 8 * (r + 1), 8);
    for (uint64_t e = e0; e < e1; ++e) {
      uint32_t entry[2];
      memcpy(entry, a.buf + v.exc_entries_at + 8 * e, 8);
      const float value = raw_to_f32(entry[1], v.dtype);
      for (uint32_t t = 0; t < a.tokens; ++t) a.y[t * a.ldy + r] += a.x[t * a.ldx + entry[0]] * value;
    }
  }
}

void rows(const Rows& a, uint64_t r0, uint64_t r1) {
  const CpuIsa isa = cpu_isa();
  for (uint64_t r = r0; r < r1; ++r) {
#if MOEOFFLOAD_X86
    if (isa == CpuIsa::Avx512) row_all_tokens<8, Avx512Row>(a, r);
    else if (isa == CpuIsa::Avx2) row_all_tokens<4, Avx2Row>(a, r);
    else
#endif
      row_all_tokens<4, PortableRow>(a, r);
  }
  add_exceptions(a, r0, r1);
}

}  // namespace

SzpMatrix szp_matrix(const uint8_t* buf, const SzpView& v, const char* what) {
  if (v.ndim != 2 || v.segment_len != v.shape[1] || v.shape[1] == 0)
    throw Error(ErrorKind::Shape,
                std::string(what) + " must be a 2-D szp matrix stored row by row (compressed from a [out, in] "
                                    "weight with 0 < in <= 2^24); got " +
                    (v.ndim == 2 ? "[" + std::to_string(v.shape[0]) + ", " + std::to_string(v.shape[1]) + "]" +
                                       (v.shape[1] ? " in segments of " + std::to_string(v.segment_len) : "")
                                 : std::to_string(v.ndim) + "-D"));
  SzpMatrix m;
  m.buf = buf;
  m.view = v;
  m.rows = v.shape[0];
  m.cols = v.shape[1];
  return m;
}

void szp_linear_f32(const SzpMatrix& w, const float* x, uint64_t ldx, uint32_t tokens, float* y, uint64_t ldy) {
  if (w.rows == 0 || tokens == 0) return;
  const Rows a{w.buf, &w.view, x, ldx, tokens, y, ldy, w.buf + w.view.total_bytes};
  const uint64_t grain = std::max<uint64_t>(1, (1 << 16) / (w.cols * tokens));
  parallel_for(w.rows, grain, [&](uint64_t r0, uint64_t r1) { rows(a, r0, r1); });
}

void szp_linear_cpu(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y) {
  uint64_t ldx;
  std::vector<float> xf = padded_f32(x, xt, tokens, w.cols, &ldx);
  std::vector<float> yf(static_cast<size_t>(tokens) * w.rows);
  szp_linear_f32(w, xf.data(), ldx, tokens, yf.data(), w.rows);
  from_f32(yf.data(), yf.size(), xt, y);
}

}  // namespace moeoffload
