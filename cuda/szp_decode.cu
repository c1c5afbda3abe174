// szp decode on the GPU: one warp per segment (a row of the weight), one lane
// per 32-value block.
//
// Layout (docs/format.md): a segment is its block widths (u8, padded to 4
// bytes) followed by the blocks' words: sign plane, then `bits` magnitude
// planes, u32 each. A lane cannot know where its block starts without the
// sizes of the blocks before it in the row, so the warp reads 32 widths at a
// time and turns their sizes into offsets with a warp prefix sum: no global
// scan, no second pass, and rows decode independently (which is what the fused
// decode+GEMV kernel will need). Values are rebuilt with the same integer
// conversions as the CPU decoder (moeoffload/dtype.h) and --fmad=false, so the
// two agree bit for bit. Exceptions (values stored exactly) are patched by the
// same warp after __syncwarp, which orders its lanes' global writes.
#include <cuda_runtime.h>

#include "moeoffload/szp_cuda.h"

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
  const int lane = threadIdx.x & 31;
  if (seg >= a.n_segments) return;  // whole warps exit together

  const uint8_t* widths = a.payload + a.seg_offsets[seg];
  const uint64_t first = seg * a.segment_len;
  const uint32_t len = static_cast<uint32_t>(min(a.segment_len, a.numel - first));
  const uint32_t nblocks = (len + 31) / 32;
  const uint8_t* data = widths + szp_widths_bytes(nblocks);
  O* seg_out = out + first;

  uint32_t running = 0;  // bytes of the blocks before this group of 32
  for (uint32_t base = 0; base < nblocks; base += 32) {
    const uint32_t k = base + lane;
    const uint32_t bits = k < nblocks ? widths[k] : 0;
    const uint32_t size = szp_block_bytes(bits);
    uint32_t incl = size;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      uint32_t t = __shfl_up_sync(full, incl, off);
      if (lane >= off) incl += t;
    }
    const uint32_t total = __shfl_sync(full, incl, 31);
    if (k < nblocks) {
      const uint32_t cnt = min(32u, len - k * 32);
      O* dst = seg_out + static_cast<uint64_t>(k) * 32;
      if (bits == 0) {
        for (uint32_t i = 0; i < cnt; ++i) dst[i] = 0;
      } else {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(data + running + incl - size);
        uint32_t mag[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) mag[i] = 0;
        for (uint32_t b = 0; b < bits; ++b) {
          const uint32_t plane = __ldg(w + 1 + b);
#pragma unroll
          for (int i = 0; i < 32; ++i) mag[i] |= ((plane >> i) & 1u) << b;
        }
        const uint32_t sign = __ldg(w);
        O vals[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int32_t neg = -static_cast<int32_t>((sign >> i) & 1u);
          const int32_t q = (static_cast<int32_t>(mag[i]) ^ neg) - neg;
          vals[i] = Stored<T>::from_f32(__fmul_rn(__int2float_rn(q), a.step));
        }
        if (cnt == 32 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
          const uint4* src = reinterpret_cast<const uint4*>(vals);
          uint4* d4 = reinterpret_cast<uint4*>(dst);
#pragma unroll
          for (int i = 0; i < static_cast<int>(32 * sizeof(O) / 16); ++i) d4[i] = src[i];
        } else {
          for (uint32_t i = 0; i < cnt; ++i) dst[i] = vals[i];
        }
      }
    }
    running += total;
  }

  if (a.exc_offsets) {
    __syncwarp();
    const uint64_t e0 = a.exc_offsets[seg], e1 = a.exc_offsets[seg + 1];
    for (uint64_t e = e0 + lane; e < e1; e += 32)
      seg_out[a.exc_entries[2 * e]] = static_cast<O>(a.exc_entries[2 * e + 1]);
  }
}

}  // namespace

int szp_decode_cuda(const SzpView& v, const uint8_t* buf, void* out, cudaStream_t stream) {
  if (v.n_segments == 0) return 0;
  DecodeArgs a;
  a.seg_offsets = reinterpret_cast<const uint64_t*>(buf + v.seg_offsets_at);
  a.exc_offsets = v.n_exceptions ? reinterpret_cast<const uint64_t*>(buf + v.exc_offsets_at) : nullptr;
  a.exc_entries = v.n_exceptions ? reinterpret_cast<const uint32_t*>(buf + v.exc_entries_at) : nullptr;
  a.payload = buf + v.payload_at;
  a.numel = v.numel;
  a.segment_len = v.segment_len;
  a.n_segments = v.n_segments;
  a.step = v.step;
  const uint64_t blocks = (v.n_segments + kWarpsPerBlock - 1) / kWarpsPerBlock;
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
