// Fused szp linear on the GPU: y[t, r] = step · Σ_c x[t, c] · q[r, c] (+ the
// row's exceptions), straight from the compressed rows.
//
// Data layout (docs/format.md, szp version 2): row r is one segment: its
// block widths (u8, padded to 4 bytes), then each block's w words of 32
// packed w-bit two's-complement fields. One warp computes one row for a tile
// of up to kTile tokens: it reads 32 widths at a time and turns them into
// block offsets with a warp prefix sum (no global scan); then, block by block,
// lane i extracts field i (szp_field, the shared decoder of szp_block.h: one
// or two words of a <= 100-byte span, a funnel shift and a sign extension),
// converts it to float and multiplies it with x[t, 32k + i] from shared
// memory for every token of the tile. The accumulators are reduced across the
// warp, scaled by the step once, and the exceptions (q = 0 in the blocks) are
// added with their stored values. x is staged in shared memory as float32 per
// thread block; rows longer than the shared budget are processed in column
// chunks that stay aligned to whole groups of 32 blocks.
#include <cuda_runtime.h>

#include "moeoffload/szp_cuda.h"
#include "warp_scan.cuh"

namespace moeoffload {

namespace {

constexpr int kWarps = 8;
constexpr int kTile = 4;                  // tokens per warp pass
constexpr uint32_t kChunkCols = 8192;     // x columns staged at a time (kTile x 32 KiB of float32)

struct LinearArgs {
  const uint8_t* buf;
  uint64_t seg_offsets_at, exc_offsets_at, exc_entries_at, payload_at;
  uint64_t rows, cols, n_exceptions;
  DType wdtype;
  float step;
  uint32_t tokens;
};

// XT: the dtype of x, YT: of y. One warp per (row, token tile).
template <DType XT, DType YT>
__global__ void __launch_bounds__(kWarps * 32)
    szp_linear_kernel(LinearArgs a, const typename Stored<XT>::type* __restrict__ x,
                      typename Stored<YT>::type* __restrict__ y) {
  extern __shared__ float xs[];  // [kTile][kChunkCols]
  const unsigned full = 0xFFFFFFFFu;
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const uint64_t row = static_cast<uint64_t>(blockIdx.x) * kWarps + warp;
  const uint32_t t0 = blockIdx.y * kTile;
  const uint32_t tiles = min(static_cast<uint32_t>(kTile), a.tokens - t0);
  const bool active = row < a.rows;

  const uint64_t* seg_offsets = reinterpret_cast<const uint64_t*>(a.buf + a.seg_offsets_at);
  const uint8_t* widths = active ? a.buf + a.payload_at + seg_offsets[row] : nullptr;
  const uint32_t nblocks = static_cast<uint32_t>((a.cols + 31) / 32);
  const uint32_t* data = active ? reinterpret_cast<const uint32_t*>(widths + szp_widths_bytes(nblocks)) : nullptr;

  float acc[kTile] = {};
  uint32_t running = 0;  // words of the blocks before the current group of 32
  for (uint32_t c0 = 0; c0 < a.cols; c0 += kChunkCols) {
    const uint32_t ccount = static_cast<uint32_t>(min(static_cast<uint64_t>(kChunkCols), a.cols - c0));
    __syncthreads();
    for (uint32_t t = 0; t < tiles; ++t)
      for (uint32_t c = threadIdx.x; c < kChunkCols; c += blockDim.x)
        xs[t * kChunkCols + c] = c < ccount ? Stored<XT>::to_f32(x[static_cast<uint64_t>(t0 + t) * a.cols + c0 + c]) : 0.0f;
    __syncthreads();
    if (!active) continue;
    const uint32_t b0 = c0 / 32, b1 = (c0 + ccount + 31) / 32;
    for (uint32_t base = b0; base < b1; base += 32) {
      const uint32_t mine = base + lane < b1 ? widths[base + lane] : 0;
      const uint32_t incl = warp_inclusive_sum(mine, lane);
      const uint32_t group = min(32u, b1 - base);
      for (uint32_t j = 0; j < group; ++j) {
        const uint32_t w = __shfl_sync(full, mine, j);
        if (w == 0) continue;  // uniform across the warp
        const uint32_t at = running + __shfl_sync(full, incl, j) - w;
        const float q = __int2float_rn(szp_field(data + at, w, lane));
        const uint32_t col = (base + j) * 32 + lane - c0;
#pragma unroll
        for (int t = 0; t < kTile; ++t) acc[t] = fmaf(q, xs[t * kChunkCols + col], acc[t]);
      }
      running += __shfl_sync(full, incl, 31);
    }
  }
  if (!active) return;
#pragma unroll
  for (int t = 0; t < kTile; ++t)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(full, acc[t], off);

  // exceptions of this row, one lane each, added to lane 0's sums
  float extra[kTile] = {};
  if (a.n_exceptions) {
    const uint64_t* exc_off = reinterpret_cast<const uint64_t*>(a.buf + a.exc_offsets_at);
    const uint32_t* entries = reinterpret_cast<const uint32_t*>(a.buf + a.exc_entries_at);
    for (uint64_t e = exc_off[row] + lane; e < exc_off[row + 1]; e += 32) {
      const uint32_t pos = entries[2 * e];
      const float value = raw_to_f32(entries[2 * e + 1], a.wdtype);
      for (uint32_t t = 0; t < tiles; ++t)
        extra[t] += value * Stored<XT>::to_f32(x[static_cast<uint64_t>(t0 + t) * a.cols + pos]);
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) extra[t] += __shfl_xor_sync(full, extra[t], off);
  }
  if (lane == 0)
    for (uint32_t t = 0; t < tiles; ++t)
      y[static_cast<uint64_t>(t0 + t) * a.rows + row] = Stored<YT>::from_f32(acc[t] * a.step + extra[t]);
}

LinearArgs linear_args(const SzpMatrix& w, uint32_t tokens) {
  LinearArgs a;
  a.buf = w.buf;
  a.seg_offsets_at = w.view.seg_offsets_at;
  a.exc_offsets_at = w.view.exc_offsets_at;
  a.exc_entries_at = w.view.exc_entries_at;
  a.payload_at = w.view.payload_at;
  a.rows = w.rows;
  a.cols = w.cols;
  a.n_exceptions = w.view.n_exceptions;
  a.wdtype = w.view.dtype;
  a.step = w.view.step;
  a.tokens = tokens;
  return a;
}

template <DType XT, DType YT>
int launch(const SzpMatrix& w, const void* x, uint32_t tokens, void* y, cudaStream_t stream) {
  const size_t shared = sizeof(float) * kTile * kChunkCols;
  // 128 KiB of dynamic shared memory needs the opt-in (sm_80: up to 163 KiB, sm_90: 227 KiB)
  cudaError_t err = cudaFuncSetAttribute(szp_linear_kernel<XT, YT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared));
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>((w.rows + kWarps - 1) / kWarps), (tokens + kTile - 1) / kTile);
  szp_linear_kernel<XT, YT><<<grid, kWarps * 32, shared, stream>>>(
      linear_args(w, tokens), static_cast<const typename Stored<XT>::type*>(x),
      static_cast<typename Stored<YT>::type*>(y));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int szp_linear_cuda_typed(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, DType yt,
                          cudaStream_t stream) {
  if (w.rows == 0 || tokens == 0) return 0;
  if ((w.rows + kWarps - 1) / kWarps > 0x7FFFFFFFull || (tokens + kTile - 1) / kTile > 65535u)
    return static_cast<int>(cudaErrorInvalidConfiguration);
  if (yt == DType::F32) {
    switch (xt) {
      case DType::F32: return launch<DType::F32, DType::F32>(w, x, tokens, y, stream);
      case DType::BF16: return launch<DType::BF16, DType::F32>(w, x, tokens, y, stream);
      case DType::F16: return launch<DType::F16, DType::F32>(w, x, tokens, y, stream);
    }
  }
  if (yt != xt) return static_cast<int>(cudaErrorInvalidValue);
  switch (xt) {
    case DType::F32: return launch<DType::F32, DType::F32>(w, x, tokens, y, stream);
    case DType::BF16: return launch<DType::BF16, DType::BF16>(w, x, tokens, y, stream);
    case DType::F16: return launch<DType::F16, DType::F16>(w, x, tokens, y, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int szp_linear_cuda(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, cudaStream_t stream) {
  return szp_linear_cuda_typed(w, x, xt, tokens, y, xt, stream);
}

}  // namespace moeoffload
