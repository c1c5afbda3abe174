// szp decode on the GPU: one warp per segment (a row of the weight); the warp
// walks the row block by block, lane i decoding value i of each block.
//
// Layout (docs/format.md, version 2): a segment is its block widths (u8,
// padded to 4 bytes) followed by each block's w words of packed w-bit fields.
// A block's start depends on the widths before it in the row, so the warp
// reads 32 widths at a time and turns them into offsets with a warp prefix
// sum: no global scan, rows decode independently. Per block the lanes read
// one or two words of a <= 100-byte span (one or a few sectors) and write 32
// consecutive values (coalesced). The field extraction and the value are the
// shared functions of szp_block.h (with __fmul_rn), so the CPU and GPU
// decoders agree bit for bit. Exceptions (values stored exactly) are patched
// by the same warp after __syncwarp, which orders its lanes' global writes.
#include <cuda_runtime.h>

#include "launch.cuh"
#include "moeoffload/szp_cuda.h"
#include "moeoffload/szp.h"
#include "moeoffload/szp_block.h"
#include "warp_scan.cuh"

namespace moeoffload {

namespace {

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

}  // namespace

int szp_decode_cuda(const SzpView& v, const uint8_t* buf, void* out, cudaStream_t stream) {
  if (v.n_segments == 0) return 0;
  if (misaligned8(buf)) return static_cast<int>(cudaErrorMisalignedAddress);
  const DecodeArgs a = decode_args(v, buf);
  const uint64_t blocks = grid_blocks(v);
  if (blocks > 0x7FFFFFFFull) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpsPerBlock * 32);
  switch (v.dtype) {
    case DType::F32: return launch_kernel(szp_decode_kernel<DType::F32>, grid, block, 0, stream, a, static_cast<uint32_t*>(out));
    case DType::BF16: return launch_kernel(szp_decode_kernel<DType::BF16>, grid, block, 0, stream, a, static_cast<uint16_t*>(out));
    case DType::F16: return launch_kernel(szp_decode_kernel<DType::F16>, grid, block, 0, stream, a, static_cast<uint16_t*>(out));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace moeoffload
