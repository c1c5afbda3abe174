// szp encoder (CPU, multithreaded over segments).
//
// For each value the encoder runs the decoder's own arithmetic — float(q) *
// step, rounded to the stored dtype — and checks |x - x_hat| <= eb in float64,
// and also |x - q * step| <= eb for the exact product the fused kernels
// multiply with. Rounding to bf16/fp16 can push round(x/step) past the bound;
// then the neighbouring q on the side of x is tried, and a value no q serves
// both ways is kept exactly as an exception. The bound therefore holds by
// construction, not by an argument about rounding. The step itself is picked
// per tensor (choose_step).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szp.h"
#include "bytes.h"
#include "szp_layout.h"

namespace moeoffload {

namespace {

using szp_layout::Chunk;

inline uint32_t read_raw(const void* data, DType t, uint64_t i) {
  if (t == DType::F32) {
    uint32_t u;
    memcpy(&u, static_cast<const uint8_t*>(data) + 4 * i, 4);
    return u;
  }
  uint16_t h;
  memcpy(&h, static_cast<const uint8_t*>(data) + 2 * i, 2);
  return h;
}

// The decoder's value for q, as a double.
inline double decoded(int32_t q, float step, DType t) {
  float v = static_cast<float>(q) * step;
  if (t == DType::BF16) return bf16_to_f32(f32_to_bf16(v));
  if (t == DType::F16) return f16_to_f32(f32_to_f16(v));
  return v;
}

constexpr int64_t kQMax = (int64_t(1) << (kSzpMaxWidth - 1)) - 1;  // |q| <= 2^24 - 1

struct BlockQ {
  int32_t q[kSzpBlock];
  int32_t qmin = 0, qmax = 0;
  uint32_t n_exceptions = 0;
  uint32_t width() const { return szp_width_for(qmin, qmax); }
};

// Quantises `cnt` values from flat index i0 (the rest of the block is 0).
// on_exception(i, raw) is called for each value kept exactly.
template <typename OnException>
inline void quantise_block(const void* data, DType t, uint64_t i0, uint32_t cnt, float step, double eb, BlockQ& out,
                           OnException&& on_exception) {
  const double step_d = step;
  auto fits = [&](double x, int64_t q) {  // q * step_d is exact in double (24 + 24 bits)
    return q >= -kQMax && q <= kQMax && std::fabs(x - decoded(static_cast<int32_t>(q), step, t)) <= eb &&
           std::fabs(x - static_cast<double>(q) * step_d) <= eb;
  };
  out.qmin = out.qmax = 0;
  out.n_exceptions = 0;
  for (uint32_t i = 0; i < kSzpBlock; ++i) {
    if (i >= cnt) {
      out.q[i] = 0;
      continue;
    }
    const uint32_t raw = read_raw(data, t, i0 + i);
    const double x = raw_to_f32(raw, t);
    const double r = x / step_d;
    const int64_t q0 = static_cast<int64_t>(std::nearbyint(r));
    int64_t q = q0;
    if (!fits(x, q)) {
      const int64_t toward = r > static_cast<double>(q0) ? 1 : -1;
      if (fits(x, q0 + toward)) q = q0 + toward;
      else if (fits(x, q0 - toward)) q = q0 - toward;
      else {  // no q meets the bound after rounding: keep the value exactly
        on_exception(i, raw);
        ++out.n_exceptions;
        q = 0;
      }
    }
    out.q[i] = static_cast<int32_t>(q);
    out.qmin = std::min(out.qmin, out.q[i]);
    out.qmax = std::max(out.qmax, out.q[i]);
  }
}

// Rounding to bf16/fp16 makes a step of exactly 2 eb leave some values with no
// q inside the bound (both neighbours round outwards), most often when eb and
// the dtype's grid line up. A slightly smaller step removes nearly all of them
// for a fraction of a bit. Pick the step that minimises the estimated size on
// an evenly spread sample of blocks (exceptions cost 64 bits each).
float choose_step(const void* data, DType t, uint64_t numel, double eb, float max_step) {
  static const float kFactors[] = {1.0f, 0.98f, 0.96f, 0.94f, 0.92f, 0.9f, 0.85f};
  const uint64_t nblocks = szp_blocks_in(numel);
  const uint64_t samples = std::min<uint64_t>(nblocks, 2048);
  if (samples == 0) return max_step;
  float best = max_step;
  double best_cost = 0;
  BlockQ bq;
  for (float f : kFactors) {
    const float step = max_step * f;
    if (step < bytes::kMinStep) continue;  // a subnormal step: the reader refuses it (bytes.h)
    double cost = 0;
    for (uint64_t j = 0; j < samples; ++j) {
      const uint64_t blk = j * nblocks / samples;
      const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, numel - blk * kSzpBlock));
      quantise_block(data, t, blk * kSzpBlock, cnt, step, eb, bq, [](uint32_t, uint32_t) {});
      cost += 8.0 + szp_block_bytes(bq.width()) * 8.0 + 64.0 * bq.n_exceptions;
    }
    if (f == 1.0f || cost < best_cost) {
      best = step;
      best_cost = cost;
    }
  }
  return best;
}

void encode_segments(const void* data, DType t, const SzpView& h, uint64_t s0, uint64_t s1, Chunk& out) {
  BlockQ bq;
  std::vector<int32_t> q;
  for (uint64_t s = s0; s < s1; ++s) {
    const uint64_t first = s * h.segment_len;
    const uint64_t len = std::min(h.segment_len, h.numel - first);
    const uint64_t nblocks = szp_blocks_in(len);
    q.resize(nblocks * kSzpBlock);
    uint64_t n_exc = 0;
    for (uint64_t k = 0; k < nblocks; ++k) {
      const uint64_t b0 = k * kSzpBlock;
      const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - b0));
      quantise_block(data, t, first + b0, cnt, h.step, h.eb, bq, [&](uint32_t i, uint32_t raw) {
        out.exceptions.push_back({static_cast<uint32_t>(b0 + i), raw});
      });
      n_exc += bq.n_exceptions;
      memcpy(q.data() + b0, bq.q, sizeof bq.q);
    }
    const size_t seg_start = out.bytes.size();
    szp_layout::pack_segment(q.data(), len, out.bytes);
    out.seg_sizes.push_back(out.bytes.size() - seg_start);
    out.exc_counts.push_back(n_exc);
  }
}

// The step for bound eb: the largest float <= 2 eb (clamped to the float range).
float step_for(double eb) {
  const double two_eb = std::min(2.0 * eb, static_cast<double>(3.4028234663852886e38));
  float step = static_cast<float>(two_eb);
  if (static_cast<double>(step) > two_eb) step = std::nextafter(step, 0.0f);
  return step;
}

// Whether eb quantises values up to maxabs without overflowing |q| (one
// neighbour of room) and with a normal step.
bool bound_fits(double maxabs, double eb) {
  const float step = step_for(eb);
  return step >= bytes::kMinStep && maxabs / step <= static_cast<double>(kQMax - 1);
}

// The smallest bound, as printed with 6 significant digits, that fits: the
// number the error message suggests must itself be accepted.
std::string smallest_bound(double maxabs) {
  double v = std::max(maxabs / (2.0 * static_cast<double>(kQMax - 1)), bytes::kMinStep / 2.0);
  for (int i = 0; i < 64; ++i, v *= 1.000001) {
    const std::string s = fmt_number(v);
    if (bound_fits(maxabs, std::strtod(s.c_str(), nullptr))) return s;
  }
  return fmt_number(v);
}

}  // namespace

SzpEncodeResult szp_encode(const void* data, DType t, const std::vector<uint64_t>& shape, double eb,
                           uint64_t segment_len) {
  if (shape.size() > kSzpMaxNdim)
    throw Error(ErrorKind::Shape, "szp supports at most 8 dimensions, got " + std::to_string(shape.size()));
  if (!(std::isfinite(eb) && eb > 0))
    throw Error(ErrorKind::InvalidBound, "error bound must be a positive finite number, got " + fmt_number(eb));
  uint64_t numel = 1;
  for (uint64_t d : shape) {
    if (d && numel > UINT64_MAX / d) throw Error(ErrorKind::Shape, "shape overflows 64-bit element count");
    numel *= d;
  }
  if (segment_len == 0) {
    uint64_t last = shape.empty() ? 1 : shape.back();
    segment_len = (shape.size() >= 2 && last > 0 && last <= kSzpMaxSegment) ? last : std::min<uint64_t>(8192, kSzpMaxSegment);
  }
  if (segment_len > kSzpMaxSegment)
    throw Error(ErrorKind::Shape, "segment length must be <= 2^24, got " + std::to_string(segment_len));

  // Finite check and range, in parallel.
  const uint64_t grain = 1 << 16;
  const uint64_t n_chunks_scan = numel ? (numel + grain - 1) / grain : 0;
  std::vector<double> chunk_max(n_chunks_scan, 0.0);
  std::vector<uint64_t> chunk_bad(n_chunks_scan, UINT64_MAX);
  parallel_for(n_chunks_scan, 1, [&](uint64_t c0, uint64_t c1) {
    for (uint64_t c = c0; c < c1; ++c) {
      double m = 0;
      for (uint64_t i = c * grain, e = std::min(numel, (c + 1) * grain); i < e; ++i) {
        float x = raw_to_f32(read_raw(data, t, i), t);
        if (!std::isfinite(x)) {
          chunk_bad[c] = i;
          break;
        }
        m = std::max(m, static_cast<double>(std::fabs(x)));
      }
      chunk_max[c] = m;
    }
  });
  double maxabs = 0;
  for (uint64_t c = 0; c < n_chunks_scan; ++c) {
    if (chunk_bad[c] != UINT64_MAX)
      throw Error(ErrorKind::NonFinite, "input holds NaN or Inf (first at flat index " + std::to_string(chunk_bad[c]) +
                                            "); error-bounded compression needs finite weights: fix or mask them first");
    maxabs = std::max(maxabs, chunk_max[c]);
  }

  if (!bound_fits(maxabs, eb))
    throw Error(ErrorKind::BoundTooSmall,
                "error bound " + fmt_number(eb) + " is too small for values up to " + fmt_number(maxabs) + ": " +
                    (step_for(eb) < bytes::kMinStep ? "its step, 2 eb, would be below float32's smallest normal number"
                                                    : "quantised values would overflow szp's 25-bit field") +
                    "; use eb >= " + smallest_bound(maxabs));
  const float step = choose_step(data, t, numel, eb, step_for(eb));

  SzpView h{};
  h.dtype = t;
  h.ndim = static_cast<uint32_t>(shape.size());
  h.eb = eb;
  h.step = step;
  h.numel = numel;
  h.segment_len = segment_len;
  h.n_segments = numel ? (numel - 1) / segment_len + 1 : 0;

  // Encode runs of segments in parallel, each worker into its own chunk.
  const uint64_t seg_per_chunk = std::max<uint64_t>(1, (1 << 16) / segment_len);
  const uint64_t n_chunks = (h.n_segments + seg_per_chunk - 1) / seg_per_chunk;
  std::vector<Chunk> chunks(n_chunks);
  parallel_for(n_chunks, 1, [&](uint64_t c0, uint64_t c1) {
    for (uint64_t c = c0; c < c1; ++c)
      encode_segments(data, t, h, c * seg_per_chunk, std::min(h.n_segments, (c + 1) * seg_per_chunk), chunks[c]);
  });

  return szp_layout::assemble(h, shape, chunks);
}

}  // namespace moeoffload
