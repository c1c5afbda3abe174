// Fused szp linear on the GPU, for a group of matrices of one shape in one launch:
// y[r_i + t, row] = step_i · Σ_c in(r_i + t, c) · q_i[row, c] (+ member i's exceptions, + its bias)
// for each member i and its rows r_i .. r_i + count_i, straight from the compressed rows. One member
// is szp_linear; a layer's routed experts are one launch per projection (moe_experts.cu) instead of a
// few launches an expert, which on a decode step cost more host time than the GPU spends on the math.
//
// Data layout (docs/format.md, szp version 2): row r is one segment: its block widths (u8, padded to
// 4 bytes), then each block's w words of 32 packed w-bit two's-complement fields. One warp computes
// one row of one member for a tile of up to Tile input rows: it reads 32 widths at a time and turns
// them into block offsets with a warp prefix sum (no global scan); then, block by block, lane i
// extracts field i (szp_field, the shared decoder of szp_block.h), converts it to float and multiplies
// it with column 32k + i of the staged input for every row of the tile. The accumulators are reduced
// across the warp, scaled by the step once, and the exceptions (q = 0 in the blocks) are added with
// their stored values. The input is staged in shared memory as float32 per thread block, in chunks of
// at most kChunkCols columns aligned to whole groups of 32 blocks; the shared memory is sized to the
// tile and the chunk, so a decode step (one row, 2048 columns: 8 KiB) leaves room for many blocks an SM.
//
// The input is either rows of x (Rows: a row map picks x's row for each input row, the tokens an
// expert was routed) or the gate and up values of an expert MLP (Gated: float32, 2 x cols a row,
// before the gate_up bias), turned into act(gate) * up while staged (mlp_gate.h), so the activation
// costs no launch of its own.
#include <cuda_runtime.h>

#include <mutex>

#include "launch.cuh"
#include "moeoffload/mlp_gate.h"
#include "moeoffload/szp_cuda.h"
#include "warp_scan.cuh"

namespace moeoffload {

namespace {

constexpr int kWarps = 8;
constexpr uint32_t kChunkCols = 8192;  // input columns staged at a time
constexpr int kMaxDevices = 64;         // devices whose shared memory limit a kernel records it raised
constexpr uint32_t kMaxMembers = 16;   // members a launch (its parameters stay under 4 KiB)

struct Member {
  const uint8_t* buf;
  uint64_t seg_offsets_at, exc_offsets_at, exc_entries_at, payload_at, n_exceptions;
  const void* gate_up_bias;  // Gated: x's dtype, 2 x cols, or null
  const void* bias;          // x's dtype, rows, or null
  float step;
  uint32_t first, count;
  DType wdtype;
};

struct GroupArgs {
  uint64_t rows, cols;
  uint32_t stride;  // staged columns a row: min(kChunkCols, cols rounded up to 32)
  uint32_t members;
  MlpConfig cfg;
  bool mapped;
  Member m[kMaxMembers];
  uint16_t row_of[kMaxRowMap];  // Rows and mapped: x's row for each input row
};

template <DType T>
__device__ __forceinline__ float bias_at(const void* b, uint64_t i) {
  return Stored<T>::to_f32(static_cast<const typename Stored<T>::type*>(b)[i]);
}

// Input row `row`, column c (< cols), as float32.
template <DType XT, bool Gated>
__device__ __forceinline__ float input_at(const GroupArgs& a, const Member& m, const void* x, uint32_t row,
                                          uint64_t c) {
  if constexpr (Gated) {
    const float* gu = static_cast<const float*>(x) + static_cast<uint64_t>(row) * 2 * a.cols;
    const bool inter = a.cfg.layout == GateLayout::Interleaved;
    const uint64_t gi = inter ? 2 * c : c, ui = inter ? 2 * c + 1 : a.cols + c;
    float g = gu[gi], u = gu[ui];
    if (m.gate_up_bias) {
      g += bias_at<XT>(m.gate_up_bias, gi);
      u += bias_at<XT>(m.gate_up_bias, ui);
    }
    return gated_value(g, u, a.cfg);
  } else {
    const uint64_t src = a.mapped ? a.row_of[row] : row;
    return Stored<XT>::to_f32(static_cast<const typename Stored<XT>::type*>(x)[src * a.cols + c]);
  }
}

// grid: (row blocks, tiles of the largest member, members). XT: x's dtype (Gated: the biases'),
// YT: y's. Shared memory: Tile x stride float32.
template <DType XT, DType YT, bool Gated, int Tile>
__global__ void __launch_bounds__(kWarps * 32)
    szp_linear_kernel(const __grid_constant__ GroupArgs a, const void* __restrict__ x,
                      typename Stored<YT>::type* __restrict__ y) {
  MOEOFFLOAD_DYNAMIC_SHARED(float, xs);  // [Tile][stride]
  const Member& m = a.m[blockIdx.z];
  const uint32_t t0 = blockIdx.y * Tile;
  if (t0 >= m.count) return;  // the whole block: this member has fewer rows than the largest
  const unsigned full = 0xFFFFFFFFu;
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const uint64_t row = static_cast<uint64_t>(blockIdx.x) * kWarps + warp;
  const uint32_t tiles = min(static_cast<uint32_t>(Tile), m.count - t0);
  const uint32_t in0 = m.first + t0;  // the tile's first input (and output) row
  const bool active = row < a.rows;

  const uint64_t* seg_offsets = reinterpret_cast<const uint64_t*>(m.buf + m.seg_offsets_at);
  const uint8_t* widths = active ? m.buf + m.payload_at + seg_offsets[row] : nullptr;
  const uint32_t nblocks = static_cast<uint32_t>((a.cols + 31) / 32);
  const uint32_t* data = active ? reinterpret_cast<const uint32_t*>(widths + szp_widths_bytes(nblocks)) : nullptr;

  float acc[Tile] = {};
  uint32_t running = 0;  // words of the blocks before the current group of 32
  for (uint64_t c0 = 0; c0 < a.cols; c0 += a.stride) {
    const uint32_t ccount = static_cast<uint32_t>(min(static_cast<uint64_t>(a.stride), a.cols - c0));
    __syncthreads();
    for (uint32_t t = 0; t < Tile; ++t)
      for (uint32_t c = threadIdx.x; c < a.stride; c += blockDim.x)
        xs[t * a.stride + c] = t < tiles && c < ccount ? input_at<XT, Gated>(a, m, x, in0 + t, c0 + c) : 0.0f;
    __syncthreads();
    if (!active) continue;
    const uint32_t b0 = static_cast<uint32_t>(c0 / 32), b1 = static_cast<uint32_t>((c0 + ccount + 31) / 32);
    for (uint32_t base = b0; base < b1; base += 32) {
      const uint32_t mine = base + lane < b1 ? widths[base + lane] : 0;
      const uint32_t incl = warp_inclusive_sum(mine, lane);
      const uint32_t group = min(32u, b1 - base);
      for (uint32_t j = 0; j < group; ++j) {
        const uint32_t w = __shfl_sync(full, mine, j);
        if (w == 0) continue;  // uniform across the warp
        const uint32_t at = running + __shfl_sync(full, incl, j) - w;
        const float q = __int2float_rn(szp_field(data + at, w, lane));
        const uint32_t col = static_cast<uint32_t>((base + j) * 32 + lane - c0);
#pragma unroll
        for (int t = 0; t < Tile; ++t) acc[t] = fmaf(q, xs[t * a.stride + col], acc[t]);
      }
      running += __shfl_sync(full, incl, 31);
    }
  }
  if (!active) return;
#pragma unroll
  for (int t = 0; t < Tile; ++t)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(full, acc[t], off);

  // exceptions of this row, one lane each, added to lane 0's sums
  float extra[Tile] = {};
  if (m.n_exceptions) {
    const uint64_t* exc_off = reinterpret_cast<const uint64_t*>(m.buf + m.exc_offsets_at);
    const uint32_t* entries = reinterpret_cast<const uint32_t*>(m.buf + m.exc_entries_at);
    for (uint64_t e = exc_off[row] + lane; e < exc_off[row + 1]; e += 32) {
      const uint32_t pos = entries[2 * e];
      const float value = raw_to_f32(entries[2 * e + 1], m.wdtype);
#pragma unroll
      for (int t = 0; t < Tile; ++t)  // unrolled over Tile, not `tiles`: extra stays in registers
        if (t < tiles) extra[t] += value * input_at<XT, Gated>(a, m, x, in0 + t, pos);
    }
#pragma unroll
    for (int t = 0; t < Tile; ++t)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) extra[t] += __shfl_xor_sync(full, extra[t], off);
  }
  if (lane == 0)
#pragma unroll
    for (int t = 0; t < Tile; ++t)
      if (t < tiles) {
        float v = acc[t] * m.step + extra[t];
        if (m.bias) v += bias_at<XT>(m.bias, row);  // not + 0: that would turn -0 into +0
        y[static_cast<uint64_t>(in0 + t) * a.rows + row] = Stored<YT>::from_f32(v);
      }
}

Member member_of(const LinearMember& lm) {
  const SzpView& v = lm.w.view;
  return Member{lm.w.buf, v.seg_offsets_at, v.exc_offsets_at, v.exc_entries_at, v.payload_at, v.n_exceptions,
                lm.gate_up_bias, lm.bias, v.step, lm.first, lm.count, v.dtype};
}

template <DType XT, DType YT, bool Gated, int Tile>
int launch(const GroupArgs& a, uint32_t most, const void* x, void* y, cudaStream_t stream) {
  const size_t shared = sizeof(float) * Tile * a.stride;
  if (shared > 48 * 1024) {  // past the default: opt in (sm_80 allows up to 163 KiB, sm_90 227 KiB)
    // Raised per kernel and device only when a launch needs more than it was raised to, never lowered:
    // set per launch to each launch's own size, a thread launching with a larger stride could find
    // the limit lowered by another's between its set and its launch. (Not raised to the most a launch
    // could ask either: sm_86/89 allow 99 KiB a block, less than 4 x kChunkCols floats.)
    static std::mutex mu;
    static size_t raised[kMaxDevices] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (device < 0 || device >= kMaxDevices) return static_cast<int>(cudaErrorInvalidDevice);
    std::lock_guard<std::mutex> lock(mu);
    if (raised[device] < shared) {
      err = cudaFuncSetAttribute(szp_linear_kernel<XT, YT, Gated, Tile>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(shared));
      if (err != cudaSuccess) return static_cast<int>(err);
      raised[device] = shared;
    }
  }
  const dim3 grid(static_cast<unsigned>((a.rows + kWarps - 1) / kWarps),
                  static_cast<unsigned>((static_cast<uint64_t>(most) + Tile - 1) / Tile), a.members);
  return launch_kernel(szp_linear_kernel<XT, YT, Gated, Tile>, grid, dim3(kWarps * 32), shared, stream, a, x,
                       static_cast<typename Stored<YT>::type*>(y));
}

template <DType XT, DType YT, bool Gated>
int launch_tiled(const GroupArgs& a, uint32_t most, const void* x, void* y, cudaStream_t stream) {
  // one row a member (a decode step) wastes no shared memory and no registers on a tile of 4
  return most == 1 ? launch<XT, YT, Gated, 1>(a, most, x, y, stream) : launch<XT, YT, Gated, 4>(a, most, x, y, stream);
}

template <DType XT>
int launch_typed(const GroupArgs& a, uint32_t most, bool gated, const void* x, void* y, DType yt,
                 cudaStream_t stream) {
  if (gated) return yt == XT ? launch_tiled<XT, XT, true>(a, most, x, y, stream) : static_cast<int>(cudaErrorInvalidValue);
  if (yt == DType::F32) return launch_tiled<XT, DType::F32, false>(a, most, x, y, stream);
  if (yt == XT) return launch_tiled<XT, XT, false>(a, most, x, y, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int szp_linear_group_cuda(const LinearInput& in, const LinearMember* members, size_t n, void* y, DType yt,
                          cudaStream_t stream) {
  if (n == 0) return 0;
  GroupArgs a;
  a.rows = members[0].w.rows;
  a.cols = members[0].w.cols;
  if (a.rows == 0) return 0;
  a.stride = static_cast<uint32_t>(a.cols < kChunkCols ? (a.cols + 31) / 32 * 32 : kChunkCols);
  a.cfg = in.cfg;
  a.mapped = in.row_of != nullptr;
  uint64_t input_rows = 0;  // how many rows the members read: the row map's length
  for (size_t i = 0; i < n; ++i) {
    const LinearMember& lm = members[i];
    if (lm.w.rows != a.rows || lm.w.cols != a.cols) return static_cast<int>(cudaErrorInvalidValue);
    if (misaligned8(lm.w.buf)) return static_cast<int>(cudaErrorMisalignedAddress);
    const uint64_t end = static_cast<uint64_t>(lm.first) + lm.count;
    input_rows = end > input_rows ? end : input_rows;
  }
  if (a.mapped) {
    if (input_rows > kMaxRowMap) return static_cast<int>(cudaErrorInvalidValue);
    for (uint64_t r = 0; r < input_rows; ++r) {
      if (in.row_of[r] > 0xFFFFu) return static_cast<int>(cudaErrorInvalidValue);
      a.row_of[r] = static_cast<uint16_t>(in.row_of[r]);
    }
  }
  if ((a.rows + kWarps - 1) / kWarps > 0x7FFFFFFFull) return static_cast<int>(cudaErrorInvalidConfiguration);
  for (size_t i0 = 0; i0 < n; i0 += kMaxMembers) {
    a.members = static_cast<uint32_t>(n - i0 < kMaxMembers ? n - i0 : kMaxMembers);
    uint32_t most = 0;
    for (uint32_t i = 0; i < a.members; ++i) {
      a.m[i] = member_of(members[i0 + i]);
      most = a.m[i].count > most ? a.m[i].count : most;
    }
    if (most == 0) continue;
    if ((static_cast<uint64_t>(most) + 3) / 4 > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    int err = static_cast<int>(cudaErrorInvalidValue);
    switch (in.xt) {
      case DType::F32: err = launch_typed<DType::F32>(a, most, in.gated, in.x, y, yt, stream); break;
      case DType::BF16: err = launch_typed<DType::BF16>(a, most, in.gated, in.x, y, yt, stream); break;
      case DType::F16: err = launch_typed<DType::F16>(a, most, in.gated, in.x, y, yt, stream); break;
    }
    if (err) return err;
  }
  return 0;
}

int szp_linear_cuda(const SzpMatrix& w, const void* x, DType xt, uint32_t tokens, void* y, cudaStream_t stream) {
  LinearInput in;
  in.x = x;
  in.xt = xt;
  LinearMember m;
  m.w = w;
  m.count = tokens;
  return szp_linear_group_cuda(in, &m, 1, y, xt, stream);
}

}  // namespace moeoffload
