// szpe CPU decoders: to values (the cpu backend's decode; bit for bit what szp_decode_cpu gives on
// the szp buffer the szpe came from) and back to that szp buffer (the transcode a fixed-width device
// cache runs on arrival; cuda/szpe_decode.cu is the same on a GPU, a warp a stream). Streams decode in
// parallel; within a stream the 32 lanes of each szp block are 32 independent rANS chains, stepped
// together by the SIMD path cpu_isa() picked (rans_block.h). Every stream must use up exactly its
// bytes and escapes and end in the encoder's initial states, or the buffer is corrupt.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>

#include "../codec/bytes.h"
#include "../codec/szp_layout.h"
#include "block_pack.h"
#include "rans_block.h"
#include "moeoffload/cpu_isa.h"
#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szp_block.h"
#include "moeoffload/szpe.h"
#include "moeoffload/szpe_stream.h"

namespace moeoffload {

namespace {

using bytes::load;

[[noreturn]] void corrupt_stream(uint64_t s) {
  bytes::corrupt("szpe", "stream " + std::to_string(s) + " does not decode to its values");
}

struct Table : RansTable {  // 40 KiB: on the heap, built once per call and shared by the threads
  Table(const uint8_t* buf, const SzpeView& e) : RansTable() { szpe_stream::build_table(buf, e, *this, 0, 1); }
};

using szpe_stream::StreamSpan;
using szpe_stream::span_of;
using szpe_stream::unzigzag;

// One stream being decoded: its 32 states, bytes and escapes. block() gives the q values of the next
// szp block; a stream that runs out of bytes or escapes, or does not end where the encoder began, is
// not ok() (checked once at its end: a corrupt stream decodes garbage until then, never out of bounds).
// R steps a full block's 32 states (rans_block.h).
template <typename R>
class StreamReader {
 public:
  StreamReader(const uint8_t* buf, const SzpeView& e, const RansTable& table, uint64_t s)
      : buf_(buf), e_(e), table_(table), b_(szpe_stream::bounds_of(buf, e, s)) {
    p_ = buf + e.payload_at + b_.bytes;  // parse checked every stream holds its states
    end_ = buf + e.payload_at + b_.bytes_end;
    for (uint32_t j = 0; j < kRansWays; ++j) x_[j] = szpe_stream::initial_state(p_, j);
    p_ += 4 * kRansWays;
    esc_ = b_.escape;
  }

  const szpe_stream::StreamBounds& bounds() const { return b_; }

  // The next block's cnt (<= 32) values: value j with state j, its word (if any) read in value order.
  void block(uint32_t cnt, int32_t* q) {
    uint32_t z[kSzpBlock];
    const uint32_t escape = e_.alphabet - 1;
    bool escapes = false;
    if (cnt == kSzpBlock && end_ - p_ >= 2 * kSzpBlock) {  // at most a word a value: no read needs its own check
      escapes = R::step(x_, p_, table_, escape, z);
    } else {  // a segment's last block, or a stream's last bytes
      for (uint32_t j = 0; j < cnt; ++j) {
        z[j] = rans_get(x_[j], table_);
        ok_ &= rans_renorm(x_[j], p_, end_);
        escapes |= z[j] == escape;
      }
    }
    if (escapes) {  // rare: each one's zigzag value is the next one stored, in value order
      for (uint32_t j = 0; j < cnt; ++j) {
        if (z[j] != escape) continue;
        if (esc_ == b_.escape_end) {
          ok_ = false;
          z[j] = 0;
        } else {
          z[j] = szpe_stream::escape_at(buf_, e_, esc_++);
        }
      }
    }
    for (uint32_t j = 0; j < cnt; ++j) q[j] = unzigzag(z[j]);
  }

  bool ok() const {
    bool ok = ok_ && p_ == end_ && esc_ == b_.escape_end;
    for (uint32_t j = 0; j < kRansWays; ++j) ok &= x_[j] == kRansLow;
    return ok;
  }

 private:
  const uint8_t* buf_;
  const SzpeView& e_;
  const RansTable& table_;
  szpe_stream::StreamBounds b_;
  uint32_t x_[kRansWays];
  const uint8_t* p_;
  const uint8_t* end_;
  uint64_t esc_;
  bool ok_ = true;
};

// Stream s's q values into q[0 .. n_values), block by block of each segment.
template <typename R>
void decode_stream(const uint8_t* buf, const SzpeView& e, const RansTable& table, uint64_t s, int32_t* q) {
  const SzpView& v = e.szp;
  const StreamSpan sp = span_of(e, s);
  StreamReader<R> r(buf, e, table, s);
  for (uint64_t g = sp.first_segment; g < sp.end_segment; ++g) {
    const uint64_t first = g * v.segment_len, len = std::min(v.segment_len, v.numel - first);
    int32_t* dst = q + (first - sp.first_value);
    for (uint64_t k = 0; k < len; k += kSzpBlock) r.block(static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - k)), dst + k);
  }
  if (!r.ok()) corrupt_stream(s);
}

// Transcodes stream s into the szp buffer `out` (view e.as_szp): its segments' widths and blocks, and
// their entries in the segment offset and exception tables (R steps the states, P packs the blocks).
// False on corrupt input; nothing is written outside the stream's stored szp range and its segments'
// and exceptions' table entries.
template <typename R, typename P>
bool transcode_stream(const uint8_t* in, const SzpeView& e, const RansTable& table, uint64_t s, uint8_t* out) {
  const SzpView& v = e.szp;
  const SzpView& o = e.as_szp;
  const StreamSpan sp = span_of(e, s);
  StreamReader<R> r(in, e, table, s);
  const szpe_stream::StreamBounds& b = r.bounds();
  uint64_t at = b.szp, exc = b.exception;
  uint8_t* const payload = out + o.payload_at;
  for (uint64_t g = sp.first_segment; g < sp.end_segment; ++g) {
    szpe_stream::store<uint64_t>(out + o.seg_offsets_at + 8 * g, at);
    const uint64_t first = g * v.segment_len;
    const uint64_t len = std::min(v.segment_len, v.numel - first);
    if (v.n_exceptions)  // szp's exception table: this segment's offset and entries
      exc = szpe_stream::write_segment_exceptions(in, e, out, g, first - sp.first_value, len, exc, b.exception_end);
    const uint64_t nblocks = szp_blocks_in(len);
    const uint64_t widths_bytes = szp_widths_bytes(nblocks);
    if (b.szp_end < at || b.szp_end - at < widths_bytes) return false;
    uint8_t* const widths = payload + at;
    for (uint64_t k = nblocks; k < widths_bytes; ++k) widths[k] = 0;
    at += widths_bytes;
    for (uint64_t k = 0; k < nblocks; ++k) {
      const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - k * kSzpBlock));
      int32_t q[kSzpBlock];
      r.block(cnt, q);
      const uint32_t w = szp_width_of(q, cnt);
      if (w > o.max_width || b.szp_end - at < szp_block_bytes(w)) return false;
      widths[k] = static_cast<uint8_t>(w);
      if (!w) continue;
      P::block(q, cnt, w, payload + at);
      at += szp_block_bytes(w);
    }
  }
  return r.ok() && at == b.szp_end && exc == b.exception_end;
}

// Streams [s0, s1)'s values into out (the whole tensor's).
template <DType T, typename R>
void streams_values(const uint8_t* buf, const SzpeView& e, const RansTable& table, uint64_t s0, uint64_t s1,
                    typename Stored<T>::type* out) {
  using O = typename Stored<T>::type;
  const SzpView& v = e.szp;
  std::vector<int32_t> q;
  for (uint64_t s = s0; s < s1; ++s) {
    const StreamSpan sp = span_of(e, s);
    q.resize(sp.n_values);
    decode_stream<R>(buf, e, table, s, q.data());
    O* dst = out + sp.first_value;
    for (uint64_t i = 0; i < sp.n_values; ++i) dst[i] = szp_value<T>(q[i], v.step);
    if (!v.n_exceptions) continue;
    const uint64_t x0 = load<uint64_t>(buf + e.exc_index_at + 8 * s);
    const uint64_t x1 = load<uint64_t>(buf + e.exc_index_at + 8 * (s + 1));
    for (uint64_t x = x0; x < x1; ++x)  // the values kept exactly (parse checked the positions)
      dst[load<uint32_t>(buf + e.exc_pos_at + 4 * x)] = static_cast<O>(szpe_stream::exception_raw(buf, e, x));
  }
}

#if MOEOFFLOAD_X86
// The SIMD paths, compiled for their ISA (flatten: the reader, the block step and the value loops all
// inline into them).
template <DType T>
[[gnu::flatten]] MOEOFFLOAD_TARGET_AVX512 void values_avx512(const uint8_t* buf, const SzpeView& e,
                                                            const RansTable& table, uint64_t s0, uint64_t s1,
                                                            typename Stored<T>::type* out) {
  streams_values<T, rans_block::Avx512>(buf, e, table, s0, s1, out);
}
template <DType T>
[[gnu::flatten]] MOEOFFLOAD_TARGET_AVX2 void values_avx2(const uint8_t* buf, const SzpeView& e, const RansTable& table,
                                                        uint64_t s0, uint64_t s1, typename Stored<T>::type* out) {
  streams_values<T, rans_block::Avx2>(buf, e, table, s0, s1, out);
}
[[gnu::flatten]] MOEOFFLOAD_TARGET_AVX512 bool transcode_avx512(const uint8_t* in, const SzpeView& e,
                                                               const RansTable& table, uint64_t s, uint8_t* out) {
  return transcode_stream<rans_block::Avx512, pack::Avx512>(in, e, table, s, out);
}
[[gnu::flatten]] MOEOFFLOAD_TARGET_AVX2 bool transcode_avx2(const uint8_t* in, const SzpeView& e,
                                                           const RansTable& table, uint64_t s, uint8_t* out) {
  return transcode_stream<rans_block::Avx2, pack::Portable>(in, e, table, s, out);
}
#endif

template <DType T>
void decode_values(const uint8_t* buf, const SzpeView& e, void* out_ptr) {
  using O = typename Stored<T>::type;
  O* out = static_cast<O*>(out_ptr);
  if (e.szp.numel == 0) return;
  const auto table = std::make_unique<Table>(buf, e);
  const CpuIsa isa = cpu_isa();
  parallel_for(e.n_streams, 1, [&](uint64_t s0, uint64_t s1) {
#if MOEOFFLOAD_X86
    if (isa == CpuIsa::Avx512) return values_avx512<T>(buf, e, *table, s0, s1, out);
    if (isa == CpuIsa::Avx2) return values_avx2<T>(buf, e, *table, s0, s1, out);
#endif
    streams_values<T, rans_block::Portable>(buf, e, *table, s0, s1, out);
  });
}

// Stream s transcoded by the path cpu_isa() picked.
bool transcode(const uint8_t* in, const SzpeView& e, const RansTable& table, uint64_t s, uint8_t* out, CpuIsa isa) {
#if MOEOFFLOAD_X86
  if (isa == CpuIsa::Avx512) return transcode_avx512(in, e, table, s, out);
  if (isa == CpuIsa::Avx2) return transcode_avx2(in, e, table, s, out);
#endif
  (void)isa;
  return transcode_stream<rans_block::Portable, pack::Portable>(in, e, table, s, out);
}

}  // namespace

void szpe_decode_cpu(const uint8_t* buf, const SzpeView& e, void* out) {
  switch (e.szp.dtype) {
    case DType::F32: return decode_values<DType::F32>(buf, e, out);
    case DType::BF16: return decode_values<DType::BF16>(buf, e, out);
    case DType::F16: return decode_values<DType::F16>(buf, e, out);
  }
}

void szpe_to_szp_into(const uint8_t* buf, const SzpeView& e, uint8_t* out) {
  const SzpView& v = e.szp;
  const SzpView& o = e.as_szp;
  szp_layout::write_header(o, v.shape, out);
  szpe_stream::write_szp_tail(e, out);  // the rest: per stream
  if (e.n_streams) {
    const auto table = std::make_unique<Table>(buf, e);
    const CpuIsa isa = cpu_isa();
    parallel_for(e.n_streams, 1, [&](uint64_t s0, uint64_t s1) {
      for (uint64_t s = s0; s < s1; ++s)
        if (!transcode(buf, e, *table, s, out, isa)) corrupt_stream(s);
    });
  }
}

std::vector<uint8_t> szpe_to_szp(const uint8_t* buf, const SzpeView& e) {
  std::vector<uint8_t> out(e.as_szp.total_bytes);
  szpe_to_szp_into(buf, e, out.data());
  if (crc32(out.data(), out.size() - 4) != e.szp_crc)
    bytes::corrupt("szpe", "the szp buffer it decodes to does not have the CRC32 it was made with");
  return out;
}

}  // namespace moeoffload
