// rANS (range asymmetric numeral systems) with a 32-bit state, 16-bit renormalisation and 12-bit
// frequencies: the entropy coder of szpe. Host + device functions; the encoder runs on the host only.
//
// State x lives in [kRansLow, 2^32), kRansLow = 2^16. Encoding symbol s (frequency f, cumulative c,
// sum of all frequencies 2^12) first emits the low 16 bits of x if x >= f * 2^(16 - 12 + 16), then
// sets x = (x / f) * 2^12 + x % f + c. Decoding reverses it: slot = x & 4095 names the symbol (the
// slot table), x = f * (x >> 12) + slot - c (>= 2^4), then one 16-bit word is read back if
// x < kRansLow: at most one a symbol, so the decoder's renormalisation is a conditional move, not a
// branch the CPU mispredicts (and one load per lane on a GPU). The encoder walks the values backwards
// and writes words backwards, so the decoder reads forwards.
// kRansWays states interleave (value i uses state i % kRansWays): independent dependency chains for
// the CPU's out-of-order core, one byte stream.
#pragma once
#include <cstdint>

#include "moeoffload/dtype.h"

namespace moeoffload {

constexpr uint32_t kRansScaleBits = 12;
constexpr uint32_t kRansTotal = 1u << kRansScaleBits;  // frequencies sum to this
constexpr uint32_t kRansLow = 1u << 16;                // lower end of the normalised state interval
constexpr uint32_t kRansWays = 4;                      // interleaved states per stream

// One slot of the decoding table in 32 bits (16 KiB a table, so it stays in L1): bits 0..11 freq - 1,
// 12..23 slot - cumulative, 24..31 the symbol.
using RansSlot = uint32_t;

MOEOFFLOAD_HD RansSlot rans_slot(uint32_t freq, uint32_t bias, uint32_t symbol) {
  return (freq - 1) | (bias << 12) | (symbol << 24);
}

// Encodes one symbol into state x, writing a renormalisation word (u16, little-endian) downwards
// from *ptr when needed (host only).
inline void rans_put(uint32_t& x, uint8_t*& ptr, uint32_t cum, uint32_t freq) {
  const uint64_t x_max = static_cast<uint64_t>((kRansLow >> kRansScaleBits) << 16) * freq;
  if (x >= x_max) {
    ptr -= 2;
    ptr[0] = static_cast<uint8_t>(x & 0xFF);
    ptr[1] = static_cast<uint8_t>((x >> 8) & 0xFF);
    x >>= 16;
  }
  x = ((x / freq) << kRansScaleBits) + (x % freq) + cum;
}

// Decodes one symbol from state x (the caller renormalises: rans_renorm).
MOEOFFLOAD_HD uint32_t rans_get(uint32_t& x, const RansSlot* table) {
  const RansSlot e = table[x & (kRansTotal - 1)];
  x = ((e & 0xFFFu) + 1) * (x >> kRansScaleBits) + ((e >> 12) & 0xFFFu);
  return e >> 24;
}

// Reads a word back into x if it is below kRansLow; false if the stream has none left (corrupt data).
MOEOFFLOAD_HD bool rans_renorm(uint32_t& x, const uint8_t*& ptr, const uint8_t* end) {
  if (x >= kRansLow) return true;
  if (end - ptr < 2) return false;
  x = (x << 16) | ptr[0] | (static_cast<uint32_t>(ptr[1]) << 8);
  ptr += 2;
  return true;
}

// rans_renorm for a caller that knows 2 bytes remain: branch-free.
MOEOFFLOAD_HD void rans_renorm_unchecked(uint32_t& x, const uint8_t*& ptr) {
  const uint32_t word = ptr[0] | (static_cast<uint32_t>(ptr[1]) << 8);
  const bool read = x < kRansLow;
  x = read ? (x << 16) | word : x;
  ptr += read ? 2 : 0;
}

}  // namespace moeoffload
