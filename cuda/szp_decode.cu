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

#include "moeoffload/szp_cuda.h"
#include "szp_decode.cuh"

namespace moeoffload {

using namespace szp_cuda;

int szp_decode_cuda(const SzpView& v, const uint8_t* buf, void* out, cudaStream_t stream) {
  if (v.n_segments == 0) return 0;
  const DecodeArgs a = decode_args(v, buf);
  const uint64_t blocks = grid_blocks(v);
  if (blocks > 0x7FFFFFFFull) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpsPerBlock * 32);
  switch (v.dtype) {
    case DType::F32:
      szp_decode_kernel<DType::F32><<<grid, block, 0, stream>>>(a, static_cast<uint32_t*>(out));
      break;
    case DType::BF16:
      szp_decode_kernel<DType::BF16><<<grid, block, 0, stream>>>(a, static_cast<uint16_t*>(out));
      break;
    case DType::F16:
      szp_decode_kernel<DType::F16><<<grid, block, 0, stream>>>(a, static_cast<uint16_t*>(out));
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moeoffload
