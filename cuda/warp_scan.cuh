// Warp-wide helpers shared by the szp kernels.
#pragma once
#include <cstdint>

namespace moeoffload {

// Inclusive prefix sum of v over the lanes of a full warp: the block offsets
// of a row from 32 block widths, with no global scan.
__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t v, uint32_t lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t t = __shfl_up_sync(0xFFFFFFFFu, v, off);
    if (lane >= static_cast<uint32_t>(off)) v += t;
  }
  return v;
}

}  // namespace moeoffload
