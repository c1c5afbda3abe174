// szpe CPU decoders: to values (the cpu backend's decode; bit for bit what szp_decode_cpu gives on
// the szp buffer the szpe came from) and back to that szp buffer (the transcode a fixed-width device
// cache would run on arrival). Streams decode in parallel; within a stream kRansWays interleaved rANS
// states give the core independent chains. Every stream must use up exactly its bytes and escapes and
// end in the encoder's initial states, or the buffer is corrupt.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>

#include "../codec/bytes.h"
#include "../codec/szp_layout.h"
#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
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

// The q values of stream s into q[0 .. n_values).
void decode_stream(const uint8_t* buf, const SzpeView& e, const RansTable& table, uint64_t s, int32_t* q) {
  const StreamSpan sp = span_of(e, s);
  const uint8_t* payload = buf + e.payload_at;
  const uint8_t* p = payload + load<uint64_t>(buf + e.stream_offsets_at + 8 * s);
  const uint8_t* end = payload + load<uint64_t>(buf + e.stream_offsets_at + 8 * (s + 1));
  uint64_t esc = load<uint64_t>(buf + e.escape_index_at + 8 * s);
  const uint64_t esc_end = load<uint64_t>(buf + e.escape_index_at + 8 * (s + 1));
  uint32_t x[kRansWays];
  memcpy(x, p, sizeof x);  // parse checked every stream holds its states
  p += sizeof x;
  const uint32_t escape = e.alphabet - 1;
  auto value_of = [&](uint32_t symbol) {  // the escape symbol takes the next stored value
    if (symbol != escape) return unzigzag(symbol);
    if (esc == esc_end) corrupt_stream(s);
    return unzigzag(szpe_stream::escape_at(buf, e, esc++));
  };
  bool ok = true;
  uint64_t i = 0;
  // Fast path: a group of kRansWays values reads at most one word a state, so while that many remain
  // no read needs its own end check.
  for (; i + kRansWays <= sp.n_values && end - p >= static_cast<ptrdiff_t>(2 * kRansWays); i += kRansWays) {
    uint32_t sym[kRansWays];
    for (uint32_t j = 0; j < kRansWays; ++j) {
      sym[j] = rans_get(x[j], table);
      rans_renorm_unchecked(x[j], p);
    }
    for (uint32_t j = 0; j < kRansWays; ++j) q[i + j] = value_of(sym[j]);
  }
  for (; i < sp.n_values; ++i) {
    const uint32_t j = i % kRansWays;
    const uint32_t symbol = rans_get(x[j], table);
    ok &= rans_renorm(x[j], p, end);
    q[i] = value_of(symbol);
  }
  for (uint32_t j = 0; j < kRansWays; ++j) ok &= x[j] == kRansLow;
  if (!ok || p != end || esc != esc_end) corrupt_stream(s);
}

template <DType T>
void decode_values(const uint8_t* buf, const SzpeView& e, void* out_ptr) {
  using O = typename Stored<T>::type;
  O* out = static_cast<O*>(out_ptr);
  const SzpView& v = e.szp;
  if (v.numel == 0) return;
  const auto table = std::make_unique<Table>(buf, e);
  parallel_for(e.n_streams, 1, [&](uint64_t s0, uint64_t s1) {
    std::vector<int32_t> q;
    for (uint64_t s = s0; s < s1; ++s) {
      const StreamSpan sp = span_of(e, s);
      q.resize(sp.n_values);
      decode_stream(buf, e, *table, s, q.data());
      O* dst = out + sp.first_value;
      for (uint64_t i = 0; i < sp.n_values; ++i) dst[i] = szp_value<T>(q[i], v.step);
      if (!v.n_exceptions) continue;
      const uint64_t x0 = load<uint64_t>(buf + e.exc_index_at + 8 * s);
      const uint64_t x1 = load<uint64_t>(buf + e.exc_index_at + 8 * (s + 1));
      for (uint64_t x = x0; x < x1; ++x)  // the values kept exactly (parse checked the positions)
        dst[load<uint32_t>(buf + e.exc_pos_at + 4 * x)] = static_cast<O>(szpe_stream::exception_raw(buf, e, x));
    }
  });
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
  if (v.numel) memcpy(out + o.seg_offsets_at + 8 * v.n_segments, &o.payload_bytes, 8);
  if (v.n_exceptions) memcpy(out + o.exc_offsets_at + 8 * v.n_segments, &v.n_exceptions, 8);  // the rest: per stream
  if (e.n_streams) {
    const auto table = std::make_unique<Table>(buf, e);
    parallel_for(e.n_streams, 1, [&](uint64_t s0, uint64_t s1) {
      for (uint64_t s = s0; s < s1; ++s)
        if (!szpe_stream::transcode(buf, e, *table, s, out)) corrupt_stream(s);
    });
  }
  memcpy(out + o.total_bytes - 4, &e.szp_crc, 4);
}

std::vector<uint8_t> szpe_to_szp(const uint8_t* buf, const SzpeView& e) {
  std::vector<uint8_t> out(e.as_szp.total_bytes);
  szpe_to_szp_into(buf, e, out.data());
  if (crc32(out.data(), out.size() - 4) != e.szp_crc)
    bytes::corrupt("szpe", "the szp buffer it decodes to does not have the CRC32 it was made with");
  return out;
}

}  // namespace moeoffload
