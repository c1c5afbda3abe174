// The szp byte layout, shared by the szp encoder and the szpe transcoder (szpe -> szp on arrival):
// packing quantised values into a segment, assembling header + tables + payload + CRC, and checking
// the exception table. Internal to the codec: both writers call the same code, so a transcoded buffer
// is the encoder's buffer byte for byte.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "moeoffload/szp.h"

namespace moeoffload::szp_layout {

struct Exception {
  uint32_t pos;  // position in its segment
  uint32_t raw;  // the exact value's bits
};

// What one worker produces for a run of consecutive segments.
struct Chunk {
  std::vector<uint8_t> bytes;
  std::vector<uint64_t> seg_sizes;
  std::vector<uint64_t> exc_counts;
  std::vector<Exception> exceptions;
};

// Appends a segment of `len` quantised values to `bytes`: widths, padding to 4, then each block's
// w-bit fields (szp_block.h). The last block's missing values are 0.
void pack_segment(const int32_t* q, uint64_t len, std::vector<uint8_t>& bytes);

// The whole buffer for header fields h (dtype, ndim, eb, step, numel, segment_len, n_segments) and
// chunks covering segments 0..n_segments-1 in order.
SzpEncodeResult assemble(SzpView h, const std::vector<uint64_t>& shape, const std::vector<Chunk>& chunks);

// Calls fn(position in segment, raw bits) for each exception of segment s, in order, from an
// exception table (u64 offsets[n_segments + 1], then {u32 pos, u32 raw} entries) already checked.
template <typename Fn>
void for_each_exception(const uint8_t* exc_offsets, const uint8_t* entries, uint64_t s, Fn&& fn) {
  uint64_t a, b;
  memcpy(&a, exc_offsets + 8 * s, 8);
  memcpy(&b, exc_offsets + 8 * (s + 1), 8);
  for (uint64_t e = a; e < b; ++e) {
    uint32_t entry[2];
    memcpy(entry, entries + 8 * e, 8);
    fn(entry[0], entry[1]);
  }
}

// h with the offsets of every region (seg_offsets_at .. payload_at, total_bytes) filled in from its
// fields (ndim, numel, n_segments, n_exceptions, payload_bytes): where the szp layout puts them.
SzpView with_offsets(SzpView h);

// The fixed header and the shape (kSzpHeaderBytes + 8 * ndim bytes) of a buffer with view h.
void write_header(const SzpView& h, const uint64_t* shape, uint8_t* out);

// Checks an exception table (u64 offsets[n_segments + 1] at exc_offsets, entries {u32 pos, u32 raw}) of
// n_exceptions entries against segment lengths and the dtype. Returns why it is invalid, or nullptr.
const char* check_exceptions(const uint8_t* exc_offsets, const uint8_t* entries, const SzpView& v);

}  // namespace moeoffload::szp_layout
