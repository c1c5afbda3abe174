// szp: the error-bounded block codec of moeoffload (the GPU format).
//
// Written from the published description of cuSZp (fixed-length mode, no
// predictor): values are quantised with the bound, q = round(x / 2eb), cut into
// blocks of 32 along the last (input) dimension, and each block is stored with
// the fewest bits that hold its values. Version 2 packs each block as w-bit
// two's-complement fields (szp_block.h) instead of version 1's bit planes: the
// same size, and a fused kernel extracts a value in a few integer operations
// instead of one per bit. Any block decodes independently; per-segment offsets
// let a GPU warp or a CPU thread find its row without a global scan.
// docs/format.md is the byte-level specification; this header is the C++ API.
//
// Guarantee: for every element, |x - decode(x)| <= eb in float64, where the
// decoded value is in the stored dtype (and so in any wider dtype), and
// |x - q * step| <= eb for the unrounded product the fused kernels use. The encoder
// runs the decoder's own arithmetic on every value and picks, among round(x/s)
// and its neighbours, a q that meets the bound after rounding to the dtype; a
// value no q serves is stored exactly as an exception.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moeoffload/dtype.h"
#include "moeoffload/szp_block.h"

namespace moeoffload {

constexpr uint32_t kSzpMagic = 0x505A534Du;  // "MSZP" little-endian
constexpr uint16_t kSzpVersion = 2;
constexpr uint32_t kSzpMaxNdim = 8;
constexpr uint64_t kSzpHeaderBytes = 64;  // fixed part; see docs/format.md
constexpr uint32_t kSzpFlagExceptions = 1u;
constexpr uint64_t kSzpMaxSegment = 1ull << 24;  // values per segment (u32 positions, 32-bit GPU indexing)

// Segment layout: ceil(len/32) width bytes padded to a multiple of 4, then
// each block's w words (szp_block.h).
MOEOFFLOAD_HD uint64_t szp_blocks_in(uint64_t len) { return (len + kSzpBlock - 1) / kSzpBlock; }
MOEOFFLOAD_HD uint64_t szp_widths_bytes(uint64_t nblocks) { return (nblocks + 3) & ~uint64_t(3); }

// A parsed, validated buffer. Offsets are in bytes from the buffer start, so
// the same view addresses a host copy and a device copy of one buffer.
struct SzpView {
  DType dtype;
  uint32_t ndim;
  uint64_t shape[kSzpMaxNdim];
  double eb;           // the absolute bound that holds
  float step;          // quantisation step (<= 2 eb)
  uint64_t numel;
  uint64_t segment_len;
  uint64_t n_segments;
  uint64_t n_exceptions;
  uint64_t payload_bytes;
  uint64_t seg_offsets_at;  // u64[n_segments + 1], relative to payload_at
  uint64_t exc_offsets_at;  // u64[n_segments + 1] (only if n_exceptions)
  uint64_t exc_entries_at;  // {u32 pos, u32 raw}[n_exceptions]
  uint64_t payload_at;
  uint64_t total_bytes;
  uint32_t max_width;       // widest block
};

struct SzpEncodeResult {
  std::vector<uint8_t> bytes;
  uint64_t n_exceptions = 0;
};

// Encodes `numel` = prod(shape) values of `dtype` at absolute bound `eb`.
// segment_len: values per independently addressable segment; 0 picks the last
// dimension (or 8192 for 0-d/1-d tensors and last dimensions above kSzpMaxSegment). Throws moeoffload::Error.
SzpEncodeResult szp_encode(const void* data, DType dtype, const std::vector<uint64_t>& shape, double eb,
                           uint64_t segment_len = 0);

// Validates the whole structure (and the CRC32 when verify_checksum) and never
// reads outside [buf, buf + len). Throws Error(CorruptData) with the reason.
SzpView szp_parse(const uint8_t* buf, size_t len, bool verify_checksum = true);

// CPU decoder (multithreaded): writes view.numel values of view.dtype to out.
void szp_decode_cpu(const uint8_t* buf, const SzpView& view, void* out);

// The quantised values q of segment s (min(segment_len, numel - s * segment_len) of them) into q;
// exceptions read 0, as they are stored.
void szp_segment_q(const uint8_t* buf, const SzpView& view, uint64_t s, int32_t* q);

// Counts the blocks of each width: hist[0..kSzpMaxWidth].
void szp_width_histogram(const uint8_t* buf, const SzpView& view, uint64_t* hist);

// CRC32 (zlib polynomial, same value as Python's zlib.crc32).
uint32_t crc32(const uint8_t* data, size_t len, uint32_t crc = 0);

}  // namespace moeoffload
