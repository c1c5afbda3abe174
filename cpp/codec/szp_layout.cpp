// The szp byte layout (docs/format.md), written by the encoder and by the szpe transcoder alike.
#include "szp_layout.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moeoffload/parallel.h"
#include "bytes.h"

namespace moeoffload::szp_layout {

namespace {

using bytes::load;
using bytes::store;

}  // namespace

void pack_segment(const int32_t* q, uint64_t len, std::vector<uint8_t>& bytes) {
  const uint64_t nblocks = szp_blocks_in(len);
  const size_t seg_start = bytes.size();
  bytes.resize(seg_start + szp_widths_bytes(nblocks), 0);
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t b0 = k * kSzpBlock;
    const uint32_t cnt = static_cast<uint32_t>(std::min<uint64_t>(kSzpBlock, len - b0));
    const uint32_t w = szp_width_of(q + b0, cnt);
    bytes[seg_start + k] = static_cast<uint8_t>(w);
    if (!w) continue;
    uint32_t words[kSzpMaxWidth];
    szp_pack_block(q + b0, cnt, w, words);
    const size_t at = bytes.size();
    bytes.resize(at + szp_block_bytes(w));
    memcpy(bytes.data() + at, words, szp_block_bytes(w));
  }
}

SzpEncodeResult assemble(SzpView h, const std::vector<uint64_t>& shape, const std::vector<Chunk>& chunks) {
  h.n_exceptions = 0;
  const uint64_t n_chunks = chunks.size();
  const uint64_t numel = h.numel;
  std::vector<uint64_t> chunk_at(n_chunks + 1, 0);
  for (uint64_t c = 0; c < n_chunks; ++c) {
    chunk_at[c + 1] = chunk_at[c] + chunks[c].bytes.size();
    h.n_exceptions += chunks[c].exceptions.size();
  }
  h.payload_bytes = chunk_at[n_chunks];
  h = with_offsets(h);

  SzpEncodeResult result;
  result.n_exceptions = h.n_exceptions;
  std::vector<uint8_t>& buf = result.bytes;
  buf.assign(h.total_bytes, 0);
  write_header(h, shape.data(), buf.data());

  uint64_t seg = 0, seg_off = 0, exc = 0;
  for (const Chunk& ch : chunks) {
    for (size_t j = 0; j < ch.exceptions.size(); ++j) {
      store<uint32_t>(buf, h.exc_entries_at + 8 * (exc + j), ch.exceptions[j].pos);
      store<uint32_t>(buf, h.exc_entries_at + 8 * (exc + j) + 4, ch.exceptions[j].raw);
    }
    for (size_t i = 0; i < ch.seg_sizes.size(); ++i, ++seg) {
      store<uint64_t>(buf, h.seg_offsets_at + 8 * seg, seg_off);
      if (h.n_exceptions) store<uint64_t>(buf, h.exc_offsets_at + 8 * seg, exc);
      seg_off += ch.seg_sizes[i];
      exc += ch.exc_counts[i];
    }
  }
  if (numel) {
    store<uint64_t>(buf, h.seg_offsets_at + 8 * seg, seg_off);
    if (h.n_exceptions) store<uint64_t>(buf, h.exc_offsets_at + 8 * seg, exc);
  }
  parallel_for(n_chunks, 1, [&](uint64_t c0, uint64_t c1) {
    for (uint64_t c = c0; c < c1; ++c)
      if (!chunks[c].bytes.empty())
        memcpy(buf.data() + h.payload_at + chunk_at[c], chunks[c].bytes.data(), chunks[c].bytes.size());
  });
  store<uint32_t>(buf, h.total_bytes - 4, crc32(buf.data(), h.total_bytes - 4));
  return result;
}

SzpView with_offsets(SzpView h) {
  const uint64_t offsets_count = h.numel ? h.n_segments + 1 : 0;
  uint64_t at = kSzpHeaderBytes + 8ull * h.ndim;
  h.seg_offsets_at = at;
  at += 8 * offsets_count;
  h.exc_offsets_at = h.exc_entries_at = 0;
  if (h.n_exceptions) {
    h.exc_offsets_at = at;
    at += 8 * offsets_count;
    h.exc_entries_at = at;
    at += 8 * h.n_exceptions;
  }
  h.payload_at = at;
  h.total_bytes = at + h.payload_bytes + 4;
  return h;
}

void write_header(const SzpView& h, const uint64_t* shape, uint8_t* out) {
  auto put = [out](uint64_t at, auto v) { memcpy(out + at, &v, sizeof v); };
  memset(out, 0, kSzpHeaderBytes);  // the reserved bytes too: a cache slot holds an earlier expert's
  put(0, kSzpMagic);
  put(4, kSzpVersion);
  out[6] = static_cast<uint8_t>(h.dtype);
  out[7] = static_cast<uint8_t>(h.ndim);
  put(8, kSzpBlock);
  put(12, h.n_exceptions ? kSzpFlagExceptions : 0u);
  put(16, h.eb);
  put(24, h.step);
  put(32, h.numel);
  put(40, h.segment_len);
  put(48, h.n_exceptions);
  put(56, h.payload_bytes);
  for (uint32_t i = 0; i < h.ndim; ++i) put(kSzpHeaderBytes + 8ull * i, shape[i]);
}

const char* check_exceptions(const uint8_t* exc_off, const uint8_t* entries, const SzpView& v) {
  if (load<uint64_t>(exc_off) != 0 || load<uint64_t>(exc_off + 8 * v.n_segments) != v.n_exceptions)
    return "exception table does not cover the exceptions";
  uint64_t prev_end = 0;
  for (uint64_t s = 0; s < v.n_segments; ++s) {
    const uint64_t a = load<uint64_t>(exc_off + 8 * s), b = load<uint64_t>(exc_off + 8 * (s + 1));
    if (a != prev_end || b < a || b > v.n_exceptions) return "exception offsets are inconsistent";
    prev_end = b;
    const uint64_t seg_len = std::min(v.segment_len, v.numel - s * v.segment_len);
    int64_t last = -1;
    for (uint64_t e = a; e < b; ++e) {
      const uint32_t pos = load<uint32_t>(entries + 8 * e);
      const uint32_t raw = load<uint32_t>(entries + 8 * e + 4);
      if (pos >= seg_len || static_cast<int64_t>(pos) <= last) return "exception position out of order or range";
      last = pos;
      if (v.dtype != DType::F32 && raw > 0xFFFFu) return "exception value does not fit the dtype";
      if (!std::isfinite(raw_to_f32(raw, v.dtype))) return "exception value is not finite";
    }
  }
  return nullptr;
}

}  // namespace moeoffload::szp_layout
