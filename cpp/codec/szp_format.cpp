// Parsing and validation of szp buffers, and the CRC32 that guards them.
// Everything a decoder (CPU or CUDA) later trusts is checked here, with
// overflow-safe arithmetic, before any output is written.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szp.h"
#include "szp_layout.h"
#include "bytes.h"

namespace moeoffload {

namespace {

using bytes::load;

struct Crc32Tables {
  uint32_t t[8][256];
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};
const Crc32Tables kCrc;

[[noreturn]] void corrupt(const std::string& why) { bytes::corrupt("szp", why); }

// a + b, or corrupt() on overflow
uint64_t add(uint64_t a, uint64_t b) { return bytes::add(a, b, "szp"); }
uint64_t mul(uint64_t a, uint64_t b) { return bytes::mul(a, b, "szp"); }

}  // namespace

uint32_t crc32(const uint8_t* p, size_t len, uint32_t crc) {
  crc = ~crc;
  while (len >= 8) {  // slicing-by-8
    uint32_t lo = load<uint32_t>(p) ^ crc;
    uint32_t hi = load<uint32_t>(p + 4);
    crc = kCrc.t[7][lo & 0xFF] ^ kCrc.t[6][(lo >> 8) & 0xFF] ^ kCrc.t[5][(lo >> 16) & 0xFF] ^ kCrc.t[4][lo >> 24] ^
          kCrc.t[3][hi & 0xFF] ^ kCrc.t[2][(hi >> 8) & 0xFF] ^ kCrc.t[1][(hi >> 16) & 0xFF] ^ kCrc.t[0][hi >> 24];
    p += 8;
    len -= 8;
  }
  while (len--) crc = (crc >> 8) ^ kCrc.t[0][(crc ^ *p++) & 0xFF];
  return ~crc;
}

SzpView szp_parse(const uint8_t* buf, size_t len, bool verify_checksum) {
  if (len < kSzpHeaderBytes + 4) corrupt("shorter than the 68-byte minimum (" + std::to_string(len) + " bytes)");
  if (load<uint32_t>(buf) != kSzpMagic) corrupt("bad magic (not an szp buffer)");
  uint16_t version = load<uint16_t>(buf + 4);
  if (version == 1)
    throw Error(ErrorKind::FormatVersion,
                "szp format version 1 (moeoffload 0.1, bit-plane blocks) is no longer read: version 2 packs "
                "blocks for the fused kernels. Re-create the buffer from the original weights "
                "(moeoffload.codec.compress), or rebuild the table (moeoffload.table.build)");
  if (version != kSzpVersion)
    throw Error(ErrorKind::FormatVersion, "szp format version " + std::to_string(version) +
                                              " is not supported by this build (it reads version " +
                                              std::to_string(kSzpVersion) + "); upgrade moeoffload");
  if (verify_checksum) {
    uint32_t stored = load<uint32_t>(buf + len - 4);
    if (crc32(buf, len - 4) != stored) corrupt("CRC32 mismatch");
  }
  SzpView v{};
  uint8_t dtype = buf[6];
  if (!dtype_is_valid(dtype)) corrupt("unknown dtype code " + std::to_string(dtype));
  v.dtype = static_cast<DType>(dtype);
  v.ndim = buf[7];
  if (v.ndim > kSzpMaxNdim) corrupt("ndim " + std::to_string(v.ndim) + " > 8");
  if (load<uint32_t>(buf + 8) != kSzpBlock) corrupt("block size is not 32");
  uint32_t flags = load<uint32_t>(buf + 12);
  if (load<uint32_t>(buf + 28) != 0) corrupt("reserved field is not 0");
  v.eb = load<double>(buf + 16);
  v.step = load<float>(buf + 24);
  v.numel = load<uint64_t>(buf + 32);
  v.segment_len = load<uint64_t>(buf + 40);
  v.n_exceptions = load<uint64_t>(buf + 48);
  v.payload_bytes = load<uint64_t>(buf + 56);
  bytes::check_bound_and_step(v.eb, v.step, "szp");
  if ((flags & ~kSzpFlagExceptions) != 0 || ((flags & kSzpFlagExceptions) != 0) != (v.n_exceptions != 0))
    corrupt("unknown flags");

  uint64_t at = kSzpHeaderBytes;
  if (len - 4 < add(at, 8ull * v.ndim)) corrupt("shape does not fit");
  for (uint32_t i = 0; i < v.ndim; ++i) v.shape[i] = load<uint64_t>(buf + at + 8ull * i);
  at += 8ull * v.ndim;
  if (bytes::numel_of(v.shape, v.ndim, "szp") != v.numel) corrupt("numel does not match the shape");
  if (v.segment_len == 0 || v.segment_len > kSzpMaxSegment) corrupt("segment length out of range");
  v.n_segments = v.numel ? (v.numel - 1) / v.segment_len + 1 : 0;
  if (v.n_exceptions > v.numel) corrupt("more exceptions than values");

  const uint64_t body = len - 4;  // CRC trailer excluded
  auto region = [&](uint64_t bytes) {
    uint64_t start = at;
    at = add(at, bytes);
    if (at > body) corrupt("truncated");
    return start;
  };
  uint64_t offsets_count = v.numel ? add(v.n_segments, 1) : 0;
  v.seg_offsets_at = region(mul(offsets_count, 8));
  if (v.n_exceptions) {
    v.exc_offsets_at = region(mul(offsets_count, 8));
    v.exc_entries_at = region(mul(v.n_exceptions, 8));
  }
  v.payload_at = region(v.payload_bytes);
  if (at != body) corrupt("length does not match the header (" + std::to_string(len) + " bytes)");
  v.total_bytes = len;
  if (v.numel == 0) {
    if (v.payload_bytes || v.n_exceptions) corrupt("empty tensor with a payload");
    return v;
  }

  // Segment offsets: start at 0, never decrease, 4-aligned, end at payload_bytes.
  const uint8_t* seg_off = buf + v.seg_offsets_at;
  if (load<uint64_t>(seg_off) != 0) corrupt("first segment offset is not 0");
  if (load<uint64_t>(seg_off + 8 * v.n_segments) != v.payload_bytes) corrupt("last segment offset != payload size");
  // Each segment's widths must be <= 25 and account for exactly its bytes.
  std::atomic<bool> bad{false};
  std::atomic<uint32_t> max_width{0};
  std::atomic<bool> non_finite{false};
  const double dtype_max = v.dtype == DType::F16 ? 65504.0 : v.dtype == DType::BF16 ? 3.3895313892515355e38
                                                                                     : 3.4028234663852886e38;
  const uint8_t* payload = buf + v.payload_at;
  const SzpView& cv = v;
  parallel_for(v.n_segments, 256, [&](uint64_t s0, uint64_t s1) {
    for (uint64_t s = s0; s < s1 && !bad.load(std::memory_order_relaxed); ++s) {
      uint64_t a = load<uint64_t>(seg_off + 8 * s), b = load<uint64_t>(seg_off + 8 * (s + 1));
      uint64_t seg_len = std::min(cv.segment_len, cv.numel - s * cv.segment_len);
      uint64_t nblocks = szp_blocks_in(seg_len);
      uint64_t wbytes = szp_widths_bytes(nblocks);
      if (b < a || (a & 3) || b - a < wbytes) {
        bad = true;
        return;
      }
      uint64_t need = wbytes;
      uint32_t widest = 0;
      for (uint64_t k = 0; k < nblocks; ++k) {
        uint8_t w = payload[a + k];
        if (w > kSzpMaxWidth) {
          bad = true;
          return;
        }
        widest = std::max<uint32_t>(widest, w);
        need += szp_block_bytes(w);
      }
      if (need != b - a) {
        bad = true;
        return;
      }
      // A block wide enough to reach past the dtype's range at this step must
      // not hold such a value: a header that decodes to Inf is corrupt data.
      if (widest && std::ldexp(static_cast<double>(cv.step), static_cast<int>(widest) - 1) >= dtype_max) {
        uint64_t at_block = a + wbytes;
        for (uint64_t k = 0; k < nblocks; ++k) {
          const uint32_t w = payload[a + k];
          if (w && std::ldexp(static_cast<double>(cv.step), static_cast<int>(w) - 1) >= dtype_max) {
            uint32_t words[kSzpMaxWidth];
            memcpy(words, payload + at_block, szp_block_bytes(w));
            for (uint32_t i = 0; i < kSzpBlock; ++i)
              if (!std::isfinite(raw_to_f32(stored_bits(static_cast<float>(szp_field(words, w, i)) * cv.step, cv.dtype),
                                            cv.dtype))) {
                bad = true;
                non_finite = true;
                return;
              }
          }
          at_block += szp_block_bytes(w);
        }
      }
      uint32_t seen = max_width.load(std::memory_order_relaxed);
      while (widest > seen && !max_width.compare_exchange_weak(seen, widest)) {
      }
    }
  });
  if (non_finite) corrupt("a value decodes beyond the range of " + std::string(dtype_name(v.dtype)) + " (step " +
                          fmt_number(v.step) + ")");
  if (bad) corrupt("segment table or block widths are inconsistent");
  v.max_width = max_width.load();
  if (v.n_exceptions)
    if (const char* why = szp_layout::check_exceptions(buf + v.exc_offsets_at, buf + v.exc_entries_at, v)) corrupt(why);
  return v;
}

void szp_segment_q(const uint8_t* buf, const SzpView& v, uint64_t s, int32_t* q) {
  const uint8_t* payload = buf + v.payload_at;
  const uint64_t a = load<uint64_t>(buf + v.seg_offsets_at + 8 * s);
  const uint64_t len = std::min(v.segment_len, v.numel - s * v.segment_len);
  const uint64_t nblocks = szp_blocks_in(len);
  uint64_t at = a + szp_widths_bytes(nblocks);
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint32_t w = payload[a + k];
    uint32_t words[kSzpMaxWidth + 1] = {};
    memcpy(words, payload + at, szp_block_bytes(w));
    int32_t block[kSzpBlock];
    szp_unpack_block(words, w, block);
    const uint64_t cnt = std::min<uint64_t>(kSzpBlock, len - k * kSzpBlock);
    memcpy(q + k * kSzpBlock, block, cnt * sizeof(int32_t));
    at += szp_block_bytes(w);
  }
}

void szp_width_histogram(const uint8_t* buf, const SzpView& v, uint64_t* hist) {
  for (uint32_t w = 0; w <= kSzpMaxWidth; ++w) hist[w] = 0;
  const uint8_t* payload = buf + v.payload_at;
  for (uint64_t s = 0; s < v.n_segments; ++s) {
    const uint64_t a = load<uint64_t>(buf + v.seg_offsets_at + 8 * s);
    const uint64_t nblocks = szp_blocks_in(std::min(v.segment_len, v.numel - s * v.segment_len));
    for (uint64_t k = 0; k < nblocks; ++k) ++hist[payload[a + k]];
  }
}

}  // namespace moeoffload
