// One MoE layer's routed experts on the GPU (moe_experts.h), in three launches on one stream whatever
// the number of experts (up to 16 a launch; more add launches): the gate_up projections of every
// routed expert (one grouped szp linear: each expert reads its tokens' rows of x through a row map, no
// gather), the down projections (grouped again, the activation computed as the input is staged, the
// down bias added, x's dtype out), and a kernel that forms each output element as transformers' eager
// loop does: its token's weighted expert outputs, experts ascending, each term and each sum rounded to
// x's dtype. A decode step's top-8 layer was 50 launches before (six an expert), each some µs of host
// time against about as much GPU time.
//
// Assignment p (the p-th of routing.order, t * k + j) owns row p of both intermediates. The row map and
// each token's rows in expert order travel in the launches' parameters (at most kMaxCudaAssignments),
// so nothing is copied from the host and the host never waits.
//
// Scratch (float32): the gate and up values [A, 2I], then the expert outputs [A, H] in x's dtype,
// A = tokens x k.
#include <cuda_runtime.h>

#include <vector>

#include "moeoffload/moe_experts.h"
#include "launch.cuh"
#include "moeoffload/szp_cuda.h"

namespace moeoffload {

namespace {

static_assert(kMaxCudaAssignments <= kMaxRowMap && kMaxCudaAssignments <= 0x10000, "rows are u16 in the row maps");

struct TokenRows {  // by value in the launch parameters (2 KiB)
  uint32_t k;
  uint16_t row[kMaxCudaAssignments];     // [t * k + i]: token t's i-th expert output row, experts ascending
  uint16_t weight[kMaxCudaAssignments];  // [t * k + i]: that row's routing weight (an index into weights)
};

template <DType T>
__global__ void weighted_sum(const __grid_constant__ TokenRows r, const typename Stored<T>::type* __restrict__ y,
                             const float* __restrict__ weights, uint64_t tokens, uint64_t H,
                             typename Stored<T>::type* __restrict__ out) {
  const uint64_t n = tokens * H;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t t = i / H, h = i % H;
    float sum = 0.0f;
    for (uint32_t j = 0; j < r.k; ++j) {
      const uint32_t at = static_cast<uint32_t>(t) * r.k + j;
      // explicit roundings: a contracted multiply-add would not be the eager loop's arithmetic
      const float term = rounded_to(__fmul_rn(weights[r.weight[at]], Stored<T>::to_f32(y[r.row[at] * H + h])), T);
      sum = rounded_to(__fadd_rn(sum, term), T);
    }
    out[i] = Stored<T>::from_f32(sum);
  }
}

unsigned grid_for(uint64_t n) { return static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535); }

int launch_sum(DType xt, const TokenRows& r, const void* y, const float* weights, uint64_t tokens, uint64_t H,
               void* out, cudaStream_t stream) {
  const dim3 grid(grid_for(tokens * H));
  switch (xt) {
    case DType::F32:
      return launch_kernel(weighted_sum<DType::F32>, grid, 256, 0, stream, r, static_cast<const uint32_t*>(y), weights,
                           tokens, H, static_cast<uint32_t*>(out));
    case DType::BF16:
      return launch_kernel(weighted_sum<DType::BF16>, grid, 256, 0, stream, r, static_cast<const uint16_t*>(y), weights,
                           tokens, H, static_cast<uint16_t*>(out));
    case DType::F16:
      return launch_kernel(weighted_sum<DType::F16>, grid, 256, 0, stream, r, static_cast<const uint16_t*>(y), weights,
                           tokens, H, static_cast<uint16_t*>(out));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int moe_experts_cuda(const Routing& routing, const std::vector<ExpertMatrices>& experts, const float* weights,
                     uint32_t tokens, uint32_t k, uint64_t H, const void* x, DType xt, const MlpConfig& cfg,
                     float* scratch, void* out, cudaStream_t stream) {
  const size_t A = routing.order.size();
  if (tokens == 0 || A == 0) return 0;
  if (A > kMaxCudaAssignments || A != static_cast<size_t>(tokens) * k || experts.size() != routing.experts.size())
    return static_cast<int>(cudaErrorInvalidValue);
  const uint64_t I = experts.front().down.cols;

  // Row p reads x's row of its token; token t's rows, in p order, are its experts ascending.
  std::vector<uint32_t> row_of(A);
  TokenRows r;
  r.k = k;
  std::vector<uint32_t> filled(tokens, 0);
  for (size_t p = 0; p < A; ++p) {
    const uint32_t at = routing.order[p], t = at / k;
    row_of[p] = t;
    const uint32_t slot = t * k + filled[t]++;
    r.row[slot] = static_cast<uint16_t>(p);
    r.weight[slot] = static_cast<uint16_t>(at);
  }

  std::vector<LinearMember> gate_up(experts.size()), down(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const uint32_t first = routing.first[i], count = routing.first[i + 1] - routing.first[i];
    gate_up[i].w = experts[i].gate_up;
    down[i].w = experts[i].down;
    gate_up[i].first = down[i].first = first;
    gate_up[i].count = down[i].count = count;
    down[i].gate_up_bias = experts[i].gate_up_bias;
    down[i].bias = experts[i].down_bias;
  }
  float* gu = scratch;
  void* y = scratch + A * 2 * I;

  const int err = expert_mlp_group_cuda(x, xt, row_of.data(), gate_up.data(), down.data(), experts.size(), cfg, gu, y,
                                        stream);
  if (err) return err;
  return launch_sum(xt, r, y, weights, tokens, H, out, stream);
}

}  // namespace moeoffload
