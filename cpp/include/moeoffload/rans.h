// rANS (range asymmetric numeral systems) with a 32-bit state, byte-wise renormalisation and 12-bit
// frequencies: the entropy coder of szpe. Host + device functions; the encoder runs on the host only.
//
// State x lives in [kRansLow, 256 * kRansLow). Encoding symbol s (frequency f, cumulative c, sum of
// all frequencies 2^12) first emits the low bytes of x until x < f * 2^(23 - 12 + 8), then sets
// x = (x / f) * 2^12 + x % f + c. Decoding reverses it: slot = x & 4095 names the symbol (the slot
// table), x = f * (x >> 12) + slot - c, then bytes are read back while x < kRansLow. The encoder
// walks the values backwards and writes bytes backwards, so the decoder reads forwards.
// kRansWays states interleave (value i uses state i % kRansWays): independent dependency chains for
// the CPU's out-of-order core, one byte stream.
#pragma once
#include <cstdint>

#include "moeoffload/dtype.h"

namespace moeoffload {

constexpr uint32_t kRansScaleBits = 12;
constexpr uint32_t kRansTotal = 1u << kRansScaleBits;  // frequencies sum to this
constexpr uint32_t kRansLow = 1u << 23;                // lower end of the normalised state interval
constexpr uint32_t kRansWays = 4;                      // interleaved states per stream

// One slot of the decoding table: the symbol, its frequency and slot - cumulative.
struct RansSlot {
  uint16_t freq;
  uint16_t bias;
  uint16_t symbol;
  uint16_t pad;
};

// Encodes one symbol into state x, writing renormalisation bytes downwards from *ptr (host only).
inline void rans_put(uint32_t& x, uint8_t*& ptr, uint32_t cum, uint32_t freq) {
  const uint32_t x_max = ((kRansLow >> kRansScaleBits) << 8) * freq;
  while (x >= x_max) {
    *--ptr = static_cast<uint8_t>(x & 0xFF);
    x >>= 8;
  }
  x = ((x / freq) << kRansScaleBits) + (x % freq) + cum;
}

// Decodes one symbol from state x (the caller renormalises: rans_renorm).
MOEOFFLOAD_HD uint32_t rans_get(uint32_t& x, const RansSlot* table) {
  const RansSlot e = table[x & (kRansTotal - 1)];
  x = e.freq * (x >> kRansScaleBits) + e.bias;
  return e.symbol;
}

// Reads bytes back into x while it is below kRansLow; false if the stream ends first (corrupt data).
MOEOFFLOAD_HD bool rans_renorm(uint32_t& x, const uint8_t*& ptr, const uint8_t* end) {
  while (x < kRansLow) {
    if (ptr >= end) return false;
    x = (x << 8) | *ptr++;
  }
  return true;
}

}  // namespace moeoffload
