// One MoE layer's routed experts on the GPU (moe_experts.h), in one native call on one stream: for
// each routed expert, a gather of its tokens' rows of x (skipped when it holds every token in order,
// the decode step), the expert MLP's kernels (expert_mlp.cu), and a kernel that adds its output rows,
// times their routing weights, to an accumulator of x's dtype's values (held as float32; each term and
// each sum rounded, as moe_experts.h says); a last kernel stores the accumulator in x's dtype. The
// expert's assignments (t * k + j, at most kMaxCudaAssignments) travel in the launch parameters, so
// nothing is copied from the host and the host never waits. The launches of one stream run in order
// and no expert is routed twice for one token (group_routing refuses it), so each accumulator element
// is read and written by one thread of one launch at a time: no atomics.
//
// Scratch (float32): the accumulator [T, H], the gathered rows [T, H] (x's dtype), the expert's output
// [T, H] (x's dtype), then expert_mlp_cuda's T x (3I + H).
#include <cuda_runtime.h>

#include "moeoffload/moe_experts.h"
#include "moeoffload/szp_cuda.h"

namespace moeoffload {

namespace {

struct Assigned {  // one expert's assignments, by value in the launch parameters (2 KiB)
  uint32_t k, n;
  uint32_t at[kMaxCudaAssignments];
};

unsigned grid_for(uint64_t n) { return static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535); }

template <DType T>
__global__ void gather_rows(const typename Stored<T>::type* x, uint64_t H, Assigned a, typename Stored<T>::type* rows) {
  const uint64_t n = static_cast<uint64_t>(a.n) * H;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    rows[i] = x[static_cast<uint64_t>(a.at[i / H] / a.k) * H + i % H];
}

template <DType T>
__global__ void add_weighted(const typename Stored<T>::type* y, uint64_t H, Assigned a, const float* weights,
                             float* acc) {
  const uint64_t n = static_cast<uint64_t>(a.n) * H;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint32_t at = a.at[i / H];
    float& sum = acc[static_cast<uint64_t>(at / a.k) * H + i % H];
    sum = rounded_to(sum + rounded_to(weights[at] * Stored<T>::to_f32(y[i]), T), T);
  }
}

template <DType T>
__global__ void round_to(const float* acc, uint64_t n, typename Stored<T>::type* out) {
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    out[i] = Stored<T>::from_f32(acc[i]);
}

template <DType T>
int run(const Routing& r, const std::vector<ExpertMatrices>& experts, const float* weights, uint32_t tokens,
        uint32_t k, uint64_t H, const void* x, const MlpConfig& cfg, float* scratch, void* out, cudaStream_t stream) {
  using S = typename Stored<T>::type;
  float* acc = scratch;
  S* rows = reinterpret_cast<S*>(acc + tokens * H);
  S* y = reinterpret_cast<S*>(acc + 2 * tokens * H);
  float* mlp = acc + 3 * tokens * H;
  cudaError_t err = cudaMemsetAsync(acc, 0, sizeof(float) * tokens * H, stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  Assigned a;
  a.k = k;
  for (size_t i = 0; i < r.experts.size(); ++i) {
    a.n = r.first[i + 1] - r.first[i];
    bool all = a.n == tokens;
    for (uint32_t j = 0; j < a.n; ++j) {
      a.at[j] = r.order[r.first[i] + j];
      all = all && a.at[j] / k == j;
    }
    const uint64_t n = static_cast<uint64_t>(a.n) * H;
    if (!all) {
      gather_rows<T><<<grid_for(n), 256, 0, stream>>>(static_cast<const S*>(x), H, a, rows);
      if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
    }
    const ExpertMatrices& m = experts[i];
    const int e = expert_mlp_cuda(m.gate_up, m.down, all ? x : rows, T, a.n, cfg, m.gate_up_bias, m.down_bias, mlp,
                                  y, stream);
    if (e) return e;
    add_weighted<T><<<grid_for(n), 256, 0, stream>>>(y, H, a, weights, acc);
    if ((err = cudaGetLastError()) != cudaSuccess) return static_cast<int>(err);
  }
  round_to<T><<<grid_for(tokens * H), 256, 0, stream>>>(acc, tokens * H, static_cast<S*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int moe_experts_cuda(const Routing& routing, const std::vector<ExpertMatrices>& experts, const float* weights,
                     uint32_t tokens, uint32_t k, uint64_t H, const void* x, DType xt, const MlpConfig& cfg,
                     float* scratch, void* out, cudaStream_t stream) {
  if (tokens == 0) return 0;
  if (routing.order.size() > kMaxCudaAssignments) return static_cast<int>(cudaErrorInvalidValue);
  switch (xt) {
    case DType::F32: return run<DType::F32>(routing, experts, weights, tokens, k, H, x, cfg, scratch, out, stream);
    case DType::BF16: return run<DType::BF16>(routing, experts, weights, tokens, k, H, x, cfg, scratch, out, stream);
    case DType::F16: return run<DType::F16>(routing, experts, weights, tokens, k, H, x, cfg, scratch, out, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace moeoffload
