// One szpe stream's layout, written once for the CPU decoders (cpp/kernels/szpe_decode.cpp: a stream
// per task, the 32 lanes of a block in a loop) and the CUDA ones (cuda/szpe_decode.cu: a stream per
// warp, lane j state j): where its bytes, escapes, exceptions and szp range start and end, its
// decoding table, its escapes and exceptions.
//
// Alignment: the format keeps every u64 table 8-aligned and the u32 and u16 arrays 4-aligned from the
// buffer start, a stream's bytes 2-aligned; the device path needs the buffers 8-aligned (its entry
// points check) and reads them with plain loads. The host path copies (any alignment).
#pragma once
#include <cstdint>
#include <cstring>

#include "moeoffload/rans.h"
#include "moeoffload/szp_block.h"
#include "moeoffload/szpe.h"

namespace moeoffload::szpe_stream {

// The CUDA emulator (tests/cuda_emulation) builds the device code for the host with
// MOEOFFLOAD_CHECK_ALIGNMENT: a load or store a GPU would fault on aborts there too.
#if defined(MOEOFFLOAD_CHECK_ALIGNMENT) && !defined(__CUDA_ARCH__)
#define MOEOFFLOAD_ALIGNED_FOR(T, p) \
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T)) __builtin_trap()
#else
#define MOEOFFLOAD_ALIGNED_FOR(T, p) (void)0
#endif

template <typename T>
MOEOFFLOAD_HD T load(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const T*>(p);
#else
  MOEOFFLOAD_ALIGNED_FOR(T, p);
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
  MOEOFFLOAD_ALIGNED_FOR(T, p);
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

// Where stream s's pieces start and end: its bytes (states first), its escapes, its exceptions (none
// without), and its range of the szp payload it transcodes to.
struct StreamBounds {
  uint64_t bytes, bytes_end, escape, escape_end, exception, exception_end, szp, szp_end;
};

MOEOFFLOAD_HD StreamBounds bounds_of(const uint8_t* buf, const SzpeView& e, uint64_t s) {
  StreamBounds b{};
  b.bytes = load<uint64_t>(buf + e.stream_offsets_at + 8 * s);
  b.bytes_end = load<uint64_t>(buf + e.stream_offsets_at + 8 * (s + 1));
  b.escape = load<uint64_t>(buf + e.escape_index_at + 8 * s);
  b.escape_end = load<uint64_t>(buf + e.escape_index_at + 8 * (s + 1));
  b.szp = load<uint64_t>(buf + e.szp_stream_offsets_at + 8 * s);
  b.szp_end = load<uint64_t>(buf + e.szp_stream_offsets_at + 8 * (s + 1));
  if (e.szp.n_exceptions) {
    b.exception = load<uint64_t>(buf + e.exc_index_at + 8 * s);
    b.exception_end = load<uint64_t>(buf + e.exc_index_at + 8 * (s + 1));
  }
  return b;
}

// Segment g's part of szp's exception table, the segment starting at value seg_start of its stream and
// len values long: its offset (the first exception x), and the entries {position in the segment, bits}
// of the stream's exceptions from x that fall in it. Returns the first exception after the segment.
// The transcoders' (CPU, and lane 0 of a GPU warp) one writer of the table.
MOEOFFLOAD_HD uint64_t write_segment_exceptions(const uint8_t* in, const SzpeView& e, uint8_t* out, uint64_t g,
                                                uint64_t seg_start, uint64_t len, uint64_t x, uint64_t end) {
  const SzpView& o = e.as_szp;
  store<uint64_t>(out + o.exc_offsets_at + 8 * g, x);
  for (; x < end; ++x) {
    const uint64_t pos = load<uint32_t>(in + e.exc_pos_at + 4 * x);
    if (pos >= seg_start + len) break;
    store<uint32_t>(out + o.exc_entries_at + 8 * x, static_cast<uint32_t>(pos - seg_start));
    store<uint32_t>(out + o.exc_entries_at + 8 * x + 4, exception_raw(in, e, x));
  }
  return x;
}

// What no stream of a transcode owns in the szp buffer: the offset tables' last entries and the CRC.
MOEOFFLOAD_HD void write_szp_tail(const SzpeView& e, uint8_t* out) {
  const SzpView& o = e.as_szp;
  if (e.szp.numel) store<uint64_t>(out + o.seg_offsets_at + 8 * e.szp.n_segments, o.payload_bytes);
  if (e.szp.n_exceptions) store<uint64_t>(out + o.exc_offsets_at + 8 * e.szp.n_segments, e.szp.n_exceptions);
  for (int i = 0; i < 4; ++i) out[o.total_bytes - 4 + i] = static_cast<uint8_t>(e.szp_crc >> (8 * i));
}

// State j of a stream (its first 4 * kRansWays bytes, 2-aligned: two u16 loads).
MOEOFFLOAD_HD uint32_t initial_state(const uint8_t* stream, uint32_t j) {
  return load<uint16_t>(stream + 4 * j) | (static_cast<uint32_t>(load<uint16_t>(stream + 4 * j + 2)) << 16);
}

}  // namespace moeoffload::szpe_stream
