// The szp decode kernel of cuda/szp_decode.cu (see there): device code only, so that
// tests/cuda_emulation runs it on the CPU, a thread a lane, before any GPU has.
#pragma once

#include "moeoffload/szp.h"
#include "moeoffload/szp_block.h"
#include "warp_scan.cuh"

namespace moeoffload::szp_cuda {

struct DecodeArgs {
  const uint64_t* seg_offsets;
  const uint64_t* exc_offsets;
  const uint32_t* exc_entries;  // {pos, raw} pairs
  const uint8_t* payload;
  uint64_t numel;
  uint64_t segment_len;
  uint64_t n_segments;
  float step;
};

constexpr int kWarpsPerBlock = 8;

template <DType T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) szp_decode_kernel(DecodeArgs a, typename Stored<T>::type* out) {
  using O = typename Stored<T>::type;
  const unsigned full = 0xFFFFFFFFu;
  const uint64_t seg = static_cast<uint64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x & 31;
  if (seg >= a.n_segments) return;  // whole warps exit together

  const uint8_t* widths = a.payload + a.seg_offsets[seg];
  const uint64_t first = seg * a.segment_len;
  const uint32_t len = static_cast<uint32_t>(min(a.segment_len, a.numel - first));
  const uint32_t nblocks = (len + 31) / 32;
  const uint32_t* data = reinterpret_cast<const uint32_t*>(widths + szp_widths_bytes(nblocks));
  O* seg_out = out + first;

  uint32_t running = 0;  // words of the blocks before this group of 32
  for (uint32_t base = 0; base < nblocks; base += 32) {
    // lane j: width of block base + j, and the words before it in the group
    const uint32_t mine = base + lane < nblocks ? widths[base + lane] : 0;
    const uint32_t incl = warp_inclusive_sum(mine, lane);
    const uint32_t group = min(32u, nblocks - base);
    for (uint32_t j = 0; j < group; ++j) {  // the warp decodes block base + j, lane i value i
      const uint32_t w = __shfl_sync(full, mine, j);
      const uint32_t at = running + __shfl_sync(full, incl, j) - w;
      const uint32_t i = (base + j) * 32 + lane;
      if (i < len) seg_out[i] = w ? szp_value<T>(szp_field(data + at, w, lane), a.step) : O(0);
    }
    running += __shfl_sync(full, incl, 31);
  }

  if (a.exc_offsets) {
    __syncwarp();
    const uint64_t e0 = a.exc_offsets[seg], e1 = a.exc_offsets[seg + 1];
    for (uint64_t e = e0 + lane; e < e1; e += 32)
      seg_out[a.exc_entries[2 * e]] = static_cast<O>(a.exc_entries[2 * e + 1]);
  }
}

// The kernel's arguments for the szp buffer of view v at buf (a device copy).
inline DecodeArgs decode_args(const SzpView& v, const uint8_t* buf) {
  DecodeArgs a;
  a.seg_offsets = reinterpret_cast<const uint64_t*>(buf + v.seg_offsets_at);
  a.exc_offsets = v.n_exceptions ? reinterpret_cast<const uint64_t*>(buf + v.exc_offsets_at) : nullptr;
  a.exc_entries = v.n_exceptions ? reinterpret_cast<const uint32_t*>(buf + v.exc_entries_at) : nullptr;
  a.payload = buf + v.payload_at;
  a.numel = v.numel;
  a.segment_len = v.segment_len;
  a.n_segments = v.n_segments;
  a.step = v.step;
  return a;
}

inline uint64_t grid_blocks(const SzpView& v) { return (v.n_segments + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace moeoffload::szp_cuda
