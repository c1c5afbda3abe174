// Parsing and validation of szpe buffers. Everything the decoders later trust is checked here with
// overflow-safe arithmetic; what only decoding can check (each stream's bytes and escapes are used up
// exactly and its states end where the encoder started) the decoders check and report as corrupt.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "moeoffload/errors.h"
#include "moeoffload/szpe.h"
#include "moeoffload/szpe_stream.h"
#include "szp_layout.h"
#include "bytes.h"

namespace moeoffload {

namespace {

using bytes::load;

[[noreturn]] void corrupt(const std::string& why) { bytes::corrupt("szpe", why); }

uint64_t add(uint64_t a, uint64_t b) { return bytes::add(a, b, "szpe"); }
uint64_t mul(uint64_t a, uint64_t b) { return bytes::mul(a, b, "szpe"); }

}  // namespace

SzpeView szpe_parse(const uint8_t* buf, size_t len, bool verify_checksum) {
  if (len < kSzpeHeaderBytes + 4) corrupt("shorter than the " + std::to_string(kSzpeHeaderBytes + 4) + "-byte minimum (" + std::to_string(len) + " bytes)");
  if (load<uint32_t>(buf) != kSzpeMagic) corrupt("bad magic (not an szpe buffer)");
  const uint16_t version = load<uint16_t>(buf + 4);
  if (version < kSzpeVersion)
    throw Error(ErrorKind::FormatVersion, "szpe format version " + std::to_string(version) +
                                              " is older than this build reads (version " +
                                              std::to_string(kSzpeVersion) +
                                              "): re-encode it from the weights or its szp buffer (a table: "
                                              "build it again, e.g. moeoffload compress --codec szpe)");
  if (version != kSzpeVersion)
    throw Error(ErrorKind::FormatVersion, "szpe format version " + std::to_string(version) +
                                              " is not supported by this build (it reads version " +
                                              std::to_string(kSzpeVersion) + "); upgrade moeoffload");
  if (verify_checksum && crc32(buf, len - 4) != load<uint32_t>(buf + len - 4)) corrupt("CRC32 mismatch");
  SzpeView e{};
  SzpView& v = e.szp;
  if (!dtype_is_valid(buf[6])) corrupt("unknown dtype code " + std::to_string(buf[6]));
  v.dtype = static_cast<DType>(buf[6]);
  v.ndim = buf[7];
  if (v.ndim > kSzpMaxNdim) corrupt("ndim " + std::to_string(v.ndim) + " > 8");
  e.alphabet = load<uint32_t>(buf + 8);
  const uint32_t flags = load<uint32_t>(buf + 12);
  v.eb = load<double>(buf + 16);
  v.step = load<float>(buf + 24);
  if (load<uint32_t>(buf + 28) != kRansScaleBits) corrupt("frequency scale is not 13 bits");
  v.numel = load<uint64_t>(buf + 32);
  v.segment_len = load<uint64_t>(buf + 40);
  v.n_exceptions = load<uint64_t>(buf + 48);
  e.n_escapes = load<uint64_t>(buf + 56);
  e.payload_bytes = load<uint64_t>(buf + 64);
  e.stream_segments = load<uint64_t>(buf + 72);
  SzpView& o = e.as_szp;
  o.payload_bytes = load<uint64_t>(buf + 80);
  o.max_width = load<uint32_t>(buf + 88);
  e.szp_crc = load<uint32_t>(buf + 92);
  if (o.max_width > kSzpMaxWidth) corrupt("szp block width above 25");
  if (e.alphabet < 1 || e.alphabet > kSzpeMaxAlphabet) corrupt("alphabet size out of range");
  bytes::check_bound_and_step(v.eb, v.step, "szpe");
  if ((flags & ~(kSzpFlagExceptions | kSzpeFlagU16Escapes)) != 0 ||
      ((flags & kSzpFlagExceptions) != 0) != (v.n_exceptions != 0))
    corrupt("unknown flags");
  e.escape_bytes = flags & kSzpeFlagU16Escapes ? 2 : 4;
  if (v.segment_len == 0 || v.segment_len > kSzpMaxSegment) corrupt("segment length out of range");
  if (e.stream_segments == 0 || e.stream_segments > std::max<uint64_t>(1, kSzpMaxSegment / v.segment_len))
    corrupt("stream length out of range");

  uint64_t at = kSzpeHeaderBytes;
  const uint64_t body = len - 4;
  auto region = [&](uint64_t bytes) {
    const uint64_t start = at;
    at = add(at, bytes);
    if (at > body) corrupt("truncated");
    return start;
  };
  region(mul(8, v.ndim));
  for (uint32_t i = 0; i < v.ndim; ++i) v.shape[i] = load<uint64_t>(buf + kSzpeHeaderBytes + 8ull * i);
  if (bytes::numel_of(v.shape, v.ndim, "szpe") != v.numel) corrupt("numel does not match the shape");
  v.n_segments = v.numel ? (v.numel - 1) / v.segment_len + 1 : 0;
  e.n_streams = v.n_segments ? (v.n_segments - 1) / e.stream_segments + 1 : 0;
  if (v.n_exceptions > v.numel || e.n_escapes > v.numel) corrupt("more exceptions or escapes than values");

  e.freq_at = region(2 * ((e.alphabet + 3) & ~3u));  // padded to 8 bytes: the u64 tables stay aligned
  e.stream_offsets_at = region(mul(add(e.n_streams, 1), 8));
  e.escape_index_at = region(mul(add(e.n_streams, 1), 8));
  e.szp_stream_offsets_at = region(mul(add(e.n_streams, 1), 8));
  auto pad4 = [](uint64_t n) { return add(n, 3) & ~uint64_t{3}; };
  if (v.n_exceptions) e.exc_index_at = region(mul(add(e.n_streams, 1), 8));
  e.exc_pos_at = region(mul(v.n_exceptions, 4));
  e.exc_raw_at = region(pad4(mul(v.n_exceptions, dtype_size(v.dtype))));
  e.escapes_at = region(pad4(mul(e.n_escapes, e.escape_bytes)));
  e.payload_at = region(e.payload_bytes);
  if (at != body) corrupt("length does not match the header (" + std::to_string(len) + " bytes)");
  e.total_bytes = len;

  // Frequencies: sum to 2^13.
  uint64_t sum = 0;
  for (uint32_t i = 0; i < e.alphabet; ++i) sum += load<uint16_t>(buf + e.freq_at + 2ull * i);
  if (sum != (1u << kRansScaleBits)) corrupt("symbol frequencies do not sum to 8192");
  // Streams: offsets from 0 to the payload size, each stream with values at least its states long;
  // escape indices from 0 to n_escapes, never decreasing.
  const uint8_t* so = buf + e.stream_offsets_at;
  const uint8_t* ei = buf + e.escape_index_at;
  if (load<uint64_t>(so) != 0 || load<uint64_t>(so + 8 * e.n_streams) != e.payload_bytes)
    corrupt("stream offsets do not cover the payload");
  if (load<uint64_t>(ei) != 0 || load<uint64_t>(ei + 8 * e.n_streams) != e.n_escapes)
    corrupt("escape index does not cover the escapes");
  // The szp buffer it transcodes to: a block is at most 25 words and a width byte, a segment's widths
  // are padded to 4 bytes and its last block may be partial: 4 bytes a value plus 104 a segment bound
  // its payload (and keep the sizes from overflow).
  const uint8_t* zo = buf + e.szp_stream_offsets_at;
  if (o.payload_bytes > add(mul(v.numel, 4), mul(v.n_segments, 104))) corrupt("szp payload size out of range");
  if (load<uint64_t>(zo) != 0 || load<uint64_t>(zo + 8 * e.n_streams) != o.payload_bytes)
    corrupt("szp stream offsets do not cover the szp payload");
  for (uint64_t s = 0; s < e.n_streams; ++s) {
    if (load<uint64_t>(so + 8 * (s + 1)) < add(load<uint64_t>(so + 8 * s), 4 * kRansWays))
      corrupt("stream " + std::to_string(s) + " is shorter than its states");
    // A GPU reads a stream's words as u16 and writes its szp blocks as u32: a misaligned offset would be
    // a fault that ends the CUDA context, not a corrupt stream. The encoder writes 2- and 4-aligned ones.
    if ((load<uint64_t>(so + 8 * (s + 1)) & 1) || (load<uint64_t>(zo + 8 * (s + 1)) & 3))
      corrupt("stream " + std::to_string(s) + " ends at a misaligned offset");
    if (load<uint64_t>(ei + 8 * (s + 1)) < load<uint64_t>(ei + 8 * s)) corrupt("escape index decreases");
    if (load<uint64_t>(zo + 8 * (s + 1)) < load<uint64_t>(zo + 8 * s)) corrupt("szp stream offsets decrease");
  }
  // Exceptions: each stream's from its index, at increasing positions inside the stream, finite.
  if (v.n_exceptions) {
    const uint8_t* xi = buf + e.exc_index_at;
    if (load<uint64_t>(xi) != 0 || load<uint64_t>(xi + 8 * e.n_streams) != v.n_exceptions)
      corrupt("exception index does not cover the exceptions");
    for (uint64_t s = 0; s < e.n_streams; ++s) {
      const uint64_t a = load<uint64_t>(xi + 8 * s), b = load<uint64_t>(xi + 8 * (s + 1));
      if (b < a || b > v.n_exceptions) corrupt("exception index decreases");
      const uint64_t n_values = szpe_stream::span_of(e, s).n_values;
      int64_t last = -1;
      for (uint64_t x = a; x < b; ++x) {
        const uint32_t pos = load<uint32_t>(buf + e.exc_pos_at + 4 * x);
        if (pos >= n_values || static_cast<int64_t>(pos) <= last) corrupt("exception position out of order or range");
        last = pos;
        if (!std::isfinite(raw_to_f32(szpe_stream::exception_raw(buf, e, x), v.dtype)))
          corrupt("exception value is not finite");
      }
    }
  }
  // Escapes: above the literals, within szp's q range, and every q decodes to a finite value.
  uint32_t widest = e.alphabet >= 2 ? e.alphabet - 2 : 0;  // the largest literal zigzag value
  for (uint64_t i = 0; i < e.n_escapes; ++i) {
    const uint32_t z = szpe_stream::escape_at(buf, e, i);
    if (z < e.alphabet - 1 || z > kSzpeMaxZigzag) corrupt("escape value out of range");
    widest = std::max(widest, z);
  }
  const float qmax = static_cast<float>((widest + 1) >> 1);  // the largest |q| of any symbol
  if (!std::isfinite(raw_to_f32(stored_bits(qmax * v.step, v.dtype), v.dtype)))
    corrupt("a value decodes beyond the range of " + std::string(dtype_name(v.dtype)) + " (step " +
            fmt_number(v.step) + ")");
  {
    SzpView h = v;  // the fields; the regions are szp's
    h.payload_bytes = o.payload_bytes;
    h.max_width = o.max_width;
    o = szp_layout::with_offsets(h);
  }
  return e;
}

}  // namespace moeoffload
