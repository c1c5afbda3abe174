// The transcode of one szpe stream into its szp segments, written once for the CPU transcoder
// (one stream per task) and the CUDA one (one stream per thread): the runtime's arrival step when
// host memory and the bus carry szpe and the device cache holds fixed-width szp.
//
// Block by block (32 values): the symbols are decoded (rans.h; value i of the stream uses state
// i % kRansWays), escapes resolved, the block's width found and its fields packed with
// szp_pack_block, the encoder's own packer. Each stream's segments start at the szp payload offset
// that szpe stores for it (docs/format.md), so no stream waits for another; the stream also writes
// its segments' entries of szp's exception table (offsets per segment, {pos, raw} entries) from its
// own exceptions. Nothing is written outside the stream's stored szp range, its segments' offset
// entries and its exceptions' entries, whatever the input: a stream that does not decode cleanly, or
// does not fill its range exactly, returns false.
//
// Alignment: the format keeps every u64 table 8-aligned and the u32 and u16 arrays 4-aligned from the
// buffer start; the device path needs both buffers 8-aligned (szpe_to_szp_cuda checks) and reads them
// with plain loads. The host path copies (any alignment).
#pragma once
#include <cstdint>
#include <cstring>

#include "moeoffload/rans.h"
#include "moeoffload/szp_block.h"
#include "moeoffload/szpe.h"

namespace moeoffload::szpe_stream {

template <typename T>
MOEOFFLOAD_HD T load(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const T*>(p);
#else
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
#endif
}

template <typename T>
MOEOFFLOAD_HD void store(uint8_t* p, T v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<T*>(p) = v;
#else
  memcpy(p, &v, sizeof(T));
#endif
}

MOEOFFLOAD_HD int32_t unzigzag(uint32_t z) { return static_cast<int32_t>(z >> 1) ^ -static_cast<int32_t>(z & 1); }

MOEOFFLOAD_HD uint32_t freq_of(const uint8_t* buf, const SzpeView& e, uint32_t symbol) {
  return buf[e.freq_at + 2 * symbol] | (static_cast<uint32_t>(buf[e.freq_at + 2 * symbol + 1]) << 8);
}

// The decoding table of an szpe buffer's frequencies, symbols first, first + stride, ... filled, so
// a CUDA block's threads share the work (first = thread, stride = threads); a host caller passes 0, 1.
MOEOFFLOAD_HD void build_table(const uint8_t* buf, const SzpeView& e, RansTable& table, uint32_t first,
                               uint32_t stride) {
  for (uint32_t symbol = first; symbol < e.alphabet; symbol += stride) {
    uint32_t cum = 0;
    for (uint32_t t = 0; t < symbol; ++t) cum += freq_of(buf, e, t);
    rans_fill(table, cum, freq_of(buf, e, symbol), symbol);  // parse checked they sum to 2^13
  }
}

// Stream s's segments [first_segment, end_segment) and values [first_value, first_value + n_values).
struct StreamSpan {
  uint64_t first_segment, end_segment, first_value, n_values;
};

MOEOFFLOAD_HD StreamSpan span_of(const SzpeView& e, uint64_t s) {
  const SzpView& v = e.szp;
  const uint64_t g0 = s * e.stream_segments;
  const uint64_t g1 = g0 + e.stream_segments < v.n_segments ? g0 + e.stream_segments : v.n_segments;
  const uint64_t first = g0 * v.segment_len, end = g1 * v.segment_len < v.numel ? g1 * v.segment_len : v.numel;
  return {g0, g1, first, end - first};
}

// Escape number i: its zigzag value.
MOEOFFLOAD_HD uint32_t escape_at(const uint8_t* buf, const SzpeView& e, uint64_t i) {
  return e.escape_bytes == 2 ? (e.alphabet - 1) + load<uint16_t>(buf + e.escapes_at + 2 * i)
                             : load<uint32_t>(buf + e.escapes_at + 4 * i);
}

// Exception number i: the value's bits (zero-extended for 16-bit dtypes).
MOEOFFLOAD_HD uint32_t exception_raw(const uint8_t* buf, const SzpeView& e, uint64_t i) {
  return e.szp.dtype != DType::F32 ? load<uint16_t>(buf + e.exc_raw_at + 2 * i)
                                      : load<uint32_t>(buf + e.exc_raw_at + 4 * i);
}

// Transcodes stream s of the szpe buffer `in` (view e) into the szp buffer `out` (view e.as_szp):
// its segments' widths and blocks, and their entries in the segment offset table. False on corrupt
// input (see above).
MOEOFFLOAD_HD bool transcode(const uint8_t* in, const SzpeView& e, const RansTable& table, uint64_t s, uint8_t* out) {
  const SzpView& v = e.szp;
  const SzpView& o = e.as_szp;
  const uint64_t g0 = s * e.stream_segments;
  const uint64_t g1 = g0 + e.stream_segments < v.n_segments ? g0 + e.stream_segments : v.n_segments;
  const uint8_t* p = in + e.payload_at + load<uint64_t>(in + e.stream_offsets_at + 8 * s);
  const uint8_t* const end = in + e.payload_at + load<uint64_t>(in + e.stream_offsets_at + 8 * (s + 1));
  uint64_t esc = load<uint64_t>(in + e.escape_index_at + 8 * s);
  const uint64_t esc_end = load<uint64_t>(in + e.escape_index_at + 8 * (s + 1));
  uint64_t at = load<uint64_t>(in + e.szp_stream_offsets_at + 8 * s);
  const uint64_t stop = load<uint64_t>(in + e.szp_stream_offsets_at + 8 * (s + 1));
  uint64_t exc = 0, exc_end = 0;  // this stream's exceptions (parse checked their index and positions)
  if (v.n_exceptions) {
    exc = load<uint64_t>(in + e.exc_index_at + 8 * s);
    exc_end = load<uint64_t>(in + e.exc_index_at + 8 * (s + 1));
  }
  if (end - p < static_cast<int64_t>(4 * kRansWays)) return false;
  // The states as scalars, rotated after each symbol (x0 is always the next one's): registers, where an
  // array indexed by i % 4 would live in memory.
  static_assert(kRansWays == 4, "the rotation below names four states");
  uint32_t x[kRansWays];
  for (uint32_t j = 0; j < kRansWays; ++j, p += 4)  // 2-aligned: byte loads
    x[j] = p[0] | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
           (static_cast<uint32_t>(p[3]) << 24);
  uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
  const uint32_t escape = e.alphabet - 1;
  uint8_t* const payload = out + o.payload_at;
  for (uint64_t g = g0; g < g1; ++g) {
    store<uint64_t>(out + o.seg_offsets_at + 8 * g, at);
    const uint64_t first = g * v.segment_len;
    const uint64_t len = v.numel - first < v.segment_len ? v.numel - first : v.segment_len;
    if (v.n_exceptions) {  // szp's exception table: this segment's offset and entries
      store<uint64_t>(out + o.exc_offsets_at + 8 * g, exc);
      const uint64_t seg_start = (g - g0) * v.segment_len;  // in the stream
      for (; exc < exc_end; ++exc) {
        const uint64_t pos = load<uint32_t>(in + e.exc_pos_at + 4 * exc);
        if (pos >= seg_start + len) break;
        store<uint32_t>(out + o.exc_entries_at + 8 * exc, static_cast<uint32_t>(pos - seg_start));
        store<uint32_t>(out + o.exc_entries_at + 8 * exc + 4, exception_raw(in, e, exc));
      }
    }
    const uint64_t nblocks = szp_blocks_in(len);
    const uint64_t widths_bytes = szp_widths_bytes(nblocks);
    if (stop < at || stop - at < widths_bytes) return false;
    uint8_t* const widths = payload + at;
    for (uint64_t k = nblocks; k < widths_bytes; ++k) widths[k] = 0;
    at += widths_bytes;
    for (uint64_t k = 0; k < nblocks; ++k) {
      const uint32_t cnt = static_cast<uint32_t>(len - k * kSzpBlock < kSzpBlock ? len - k * kSzpBlock : kSzpBlock);
      int32_t q[kSzpBlock];
      int32_t qmin = 0, qmax = 0;
      // A symbol reads at most one word: with 2 * cnt bytes left no read needs its own end check.
      const bool room = end - p >= static_cast<int64_t>(2 * cnt);
      for (uint32_t i = 0; i < cnt; ++i) {
        uint32_t z = rans_get(x0, table);
        if (room)
          rans_renorm_unchecked(x0, p);
        else if (!rans_renorm(x0, p, end))
          return false;
        const uint32_t t = x0;
        x0 = x1, x1 = x2, x2 = x3, x3 = t;
        if (z == escape) {  // its zigzag value is the next one stored
          if (esc == esc_end) return false;
          z = escape_at(in, e, esc++);
        }
        q[i] = unzigzag(z);
        qmin = q[i] < qmin ? q[i] : qmin;
        qmax = q[i] > qmax ? q[i] : qmax;
      }
      const uint32_t w = szp_width_for(qmin, qmax);
      if (w > o.max_width || stop - at < szp_block_bytes(w)) return false;
      widths[k] = static_cast<uint8_t>(w);
      if (!w) continue;
#if defined(__CUDA_ARCH__)
      szp_pack_block(q, cnt, w, reinterpret_cast<uint32_t*>(payload + at));
#else
      uint32_t words[kSzpMaxWidth];
      szp_pack_block(q, cnt, w, words);
      memcpy(payload + at, words, szp_block_bytes(w));
#endif
      at += szp_block_bytes(w);
    }
  }
  return at == stop && p == end && esc == esc_end && exc == exc_end && x0 == kRansLow && x1 == kRansLow && x2 == kRansLow &&
         x3 == kRansLow;
}

}  // namespace moeoffload::szpe_stream
