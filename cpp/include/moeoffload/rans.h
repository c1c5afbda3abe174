// rANS (range asymmetric numeral systems) with a 32-bit state, 16-bit renormalisation and 13-bit
// frequencies: the entropy coder of szpe. Host + device functions; the encoder runs on the host only.
//
// State x lives in [kRansLow, 2^32), kRansLow = 2^16. Encoding symbol s (frequency f, cumulative c,
// sum of all frequencies 2^M, M = 13) first emits the low 16 bits of x if x >= f * 2^(32 - M), then
// sets x = (x / f) * 2^M + x % f + c. Decoding reverses it: slot = x mod 2^M names the symbol, and
// x = f * (x >> M) + slot - c (>= 2^(16 - M)), then one 16-bit word is read back if x < kRansLow: at
// most one a symbol, so the decoder's renormalisation is a conditional move, not a branch the CPU
// mispredicts (and one load per lane on a GPU). The encoder walks the values backwards and writes
// words backwards, so the decoder reads forwards.
// kRansWays = 32 states interleave, one per value of an szp block: value j of every 32-value block
// (counted from its segment's start) uses state j, so a warp decodes a block in one step, lane j
// state j, and a CPU core has 32 independent dependency chains. The renormalisation words are read in
// value order, so within a block lane j's word follows those of the lanes before it that read one
// (a ballot and a popcount on a GPU). Each stream stores its 32 final encoder states: 128 bytes,
// which is why streams are long (about 65536 values).
//
// The decoding table has two arrays indexed by the slot: the state step (f and slot - c, one u32) and
// the symbol (u8). Only the first is on the state's dependency chain. They take 40 KiB: inside a
// 48 KiB L1d, partly in L2 on cores with 32 KiB; on a GPU, static shared memory shared by the 8
// warps (streams) of a block. 12-bit frequencies (16 KiB) lost about 0.02 bits a value to rounding on wide
// alphabets (MiniLM at 0.02-0.05 sigma); 13 bits lose a third of that, and decode as fast on the CPU
// (bench/results/codec-cpu.md).
#pragma once
#include <cstdint>

#include "moeoffload/dtype.h"

namespace moeoffload {

constexpr uint32_t kRansScaleBits = 13;
constexpr uint32_t kRansLow = 1u << 16;  // lower end of the normalised state interval
constexpr uint32_t kRansWays = 32;       // interleaved states per stream: one per value of an szp block

// The decoding table of frequencies summing to 2^kRansScaleBits.
struct RansTable {
  uint32_t step[1u << kRansScaleBits];  // freq | (slot - cum) << 16
  uint8_t symbol[1u << kRansScaleBits];
};

// Fills the slots of one symbol (cumulative cum, frequency freq).
MOEOFFLOAD_HD void rans_fill(RansTable& t, uint32_t cum, uint32_t freq, uint32_t symbol) {
  for (uint32_t i = 0; i < freq; ++i) {
    t.step[cum + i] = freq | (i << 16);
    t.symbol[cum + i] = static_cast<uint8_t>(symbol);
  }
}

// Encodes one symbol into state x, writing a renormalisation word (u16, little-endian) downwards
// from *ptr when needed (host only).
inline void rans_put(uint32_t& x, uint8_t*& ptr, uint32_t cum, uint32_t freq) {
  const uint64_t x_max = static_cast<uint64_t>(freq) << (32 - kRansScaleBits);
  if (x >= x_max) {
    ptr -= 2;
    ptr[0] = static_cast<uint8_t>(x & 0xFF);
    ptr[1] = static_cast<uint8_t>((x >> 8) & 0xFF);
    x >>= 16;
  }
  x = ((x / freq) << kRansScaleBits) + (x % freq) + cum;
}

// Decodes one symbol from state x (the caller renormalises: rans_renorm).
MOEOFFLOAD_HD uint32_t rans_get(uint32_t& x, const RansTable& t) {
  const uint32_t slot = x & ((1u << kRansScaleBits) - 1);
  const uint32_t step = t.step[slot];
  x = (step & 0xFFFFu) * (x >> kRansScaleBits) + (step >> 16);
  return t.symbol[slot];
}

// Reads a word back into x if it is below kRansLow; false if the stream has none left (corrupt data).
MOEOFFLOAD_HD bool rans_renorm(uint32_t& x, const uint8_t*& ptr, const uint8_t* end) {
  if (x >= kRansLow) return true;
  if (end - ptr < 2) return false;
  x = (x << 16) | ptr[0] | (static_cast<uint32_t>(ptr[1]) << 8);
  ptr += 2;
  return true;
}

// rans_renorm for a caller that knows 2 bytes remain: branch-free by construction (masks and a shift
// by 0 or 16), since a compiler turned the conditional form into a branch that mispredicts about as
// often as a symbol needs a word (half the decode speed).
MOEOFFLOAD_HD void rans_renorm_unchecked(uint32_t& x, const uint8_t*& ptr) {
  const uint32_t word = ptr[0] | (static_cast<uint32_t>(ptr[1]) << 8);
  const uint32_t read = x < kRansLow ? 1u : 0u;
  x = (x << (16 * read)) | (word & (0u - read));
  ptr += 2 * read;
}

}  // namespace moeoffload
