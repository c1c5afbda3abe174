// szpe: szp's quantised values, entropy coded. The same q (and the same exceptions) as the szp buffer
// it was made from, so decoding gives szp's values bit for bit and the bound is szp's; the bytes are
// rANS streams (rans.h) of the q values, near their order-0 entropy instead of szp's fixed-width
// blocks. docs/format.md is the byte-level specification.
//
// q is mapped to a symbol by zigzag (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...); symbols 0..A-2 are coded
// directly and every larger one as the escape symbol A-1, its zigzag value stored apart (in order:
// z - (A-1) as u16 when every escape of the tensor fits, else z as u32). One frequency table per
// tensor (alphabet A picked per tensor to minimise the size), 13-bit.
// Independent streams of `stream_segments` szp segments (rows) each, with byte offsets, escape and
// exception indices stored, so a thread (or a warp) starts at any stream without a scan. szp's
// exceptions (values kept exactly) are stored per stream: their position in the stream (u32) and
// their bits at the dtype's width, instead of szp's offset per segment (8 bytes a row).
//
// Two decoders: values (szpe_decode_cpu, what szp_decode_cpu gives), and the szp buffer itself
// (szpe_to_szp: the transcode a device cache of fixed-width szp would run on arrival).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moeoffload/rans.h"
#include "moeoffload/szp.h"

namespace moeoffload {

constexpr uint32_t kSzpeMagic = 0x455A534Du;  // "MSZE" little-endian
constexpr uint16_t kSzpeVersion = 4;
constexpr uint32_t kSzpeFlagU16Escapes = 2;  // flags bit 1 (bit 0 is szp's: has exceptions)
constexpr uint64_t kSzpeHeaderBytes = 96;
constexpr uint32_t kSzpeMaxAlphabet = 256;
constexpr uint32_t kSzpeMaxZigzag = (1u << kSzpMaxWidth) - 2;  // |q| <= 2^24 - 1, what szp's encoder writes
// Values a stream holds by default (whole segments): its 32 states and 4 offsets (160 bytes) cost
// 0.02 bits a value, and a 1 GiB bf16 tensor has 8192 streams, a warp each on a GPU.
constexpr uint64_t kSzpeStreamValues = 65536;

struct SzpeView {
  SzpView szp;  // dtype, ndim, shape, eb, step, numel, segment_len, n_segments, n_exceptions (its
                // region offsets are unused: szpe's own sections follow)
  uint32_t alphabet;         // A: symbols 0..A-2 literal, A-1 escape
  uint32_t escape_bytes;     // 2: u16 z - (A-1); 4: u32 z
  uint64_t stream_segments;  // szp segments per stream
  uint64_t n_streams;
  uint64_t n_escapes;
  SzpView as_szp;  // the szp buffer it transcodes to (szpe_to_szp): its regions, in that buffer
  uint32_t szp_crc;  // that buffer's CRC32
  uint64_t freq_at;                // u16[A]
  uint64_t stream_offsets_at;      // u64[n_streams + 1], relative to payload_at
  uint64_t escape_index_at;        // u64[n_streams + 1]: the escapes before each stream
  uint64_t szp_stream_offsets_at;  // u64[n_streams + 1]: where each stream's segments start in the szp payload
  uint64_t exc_index_at;     // u64[n_streams + 1]: the exceptions before each stream (with exceptions)
  uint64_t exc_pos_at;       // u32[n_exceptions]: position in its stream, increasing within a stream
  uint64_t exc_raw_at;       // [n_exceptions] the value's bits at the dtype's width (u16 or u32)
  uint64_t escapes_at;       // [n_escapes] u16 or u32 (escape_bytes)
  uint64_t payload_at;
  uint64_t payload_bytes;
  uint64_t total_bytes;
};

// Entropy-codes a valid szp buffer (szp_parse). stream_segments 0 picks about kSzpeStreamValues a stream.
std::vector<uint8_t> szpe_from_szp(const uint8_t* szp, const SzpView& view, uint64_t stream_segments = 0);

// Validates the structure (and the CRC32 when verify_checksum); never reads outside [buf, buf + len).
// Throws Error(CorruptData) with the reason, Error(FormatVersion) for another version.
SzpeView szpe_parse(const uint8_t* buf, size_t len, bool verify_checksum = true);

// Values of view.szp.dtype, bit for bit those of szp_decode_cpu on the szp buffer it came from
// (multithreaded over streams). A stream that does not decode cleanly throws Error(CorruptData).
void szpe_decode_cpu(const uint8_t* buf, const SzpeView& view, void* out);

// The szp buffer it was made from, byte for byte; Error(CorruptData) when that buffer's CRC32 is not
// the one szpe stored (a change to the szpe that still decodes).
std::vector<uint8_t> szpe_to_szp(const uint8_t* buf, const SzpeView& view);
// The same into out[0 .. view.as_szp.total_bytes) (a device cache slot on the cpu backend), without
// the CRC check: the arrival step of the runtime, on a buffer parsed (CRC checked) when it was loaded.
// Streams transcode in parallel (szpe_stream.h); a corrupt stream throws Error(CorruptData), and out
// is then undefined but never written outside that range.
void szpe_to_szp_into(const uint8_t* buf, const SzpeView& view, uint8_t* out);

}  // namespace moeoffload
