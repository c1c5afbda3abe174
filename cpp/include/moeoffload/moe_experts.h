// One MoE layer's routed experts in one native call: out[t] = Σ_j w[t, j] · expert_{e[t, j]}(x[t]),
// each expert the fused MLP of its szp matrices (expert_mlp). It replaces a Python loop that paid an
// op dispatch, a torch.where, a gather, a multiply and an index_add per expert (about 100 µs of host
// time an expert, against a few µs of GPU time for a decode step's expert), so a 48-layer top-8 model
// spends its host time on the model, not on glue.
//
// The routing (top-k expert indices [T, k], on the host) is grouped by expert first: the assignments
// t * k + j of each routed expert, experts ascending, tokens ascending within one. Each expert then
// runs on the rows of x its tokens hold (x itself when it holds every token in order, the decode
// case), and its output rows, times their weights, are added to the output in x's dtype: each term
// rounded to it, then each sum. That is the arithmetic of transformers' eager experts loop (multiply,
// cast, index_add_, expert by expert ascending), so the layer gives that loop's numbers on the same
// expert outputs; a float32 sum rounded once moved a random 3-layer GPT-OSS's logits by 0.17 against
// it, where rounding like it moves them by 0.01.
#pragma once
#include <cstdint>
#include <vector>

#include "moeoffload/cpu_kernels.h"

typedef struct CUstream_st* cudaStream_t;

namespace moeoffload {

struct Routing {
  std::vector<uint32_t> experts;  // the routed experts, ascending
  std::vector<uint32_t> first;    // [experts.size() + 1]: where each one's assignments start in `order`
  std::vector<uint32_t> order;    // [T * k] assignments t * k + j, grouped by expert, tokens ascending
};

// Groups top-k indices [tokens, k]; InvalidArgument naming the first index outside [0, num_experts) or
// an expert routed twice for one token (top-k never does; the output rows are then written once an expert).
Routing group_routing(const int64_t* index, uint32_t tokens, uint32_t k, uint32_t num_experts);

// The matrices and biases (of x's dtype, or null) of one routed expert.
struct ExpertMatrices {
  SzpMatrix gate_up, down;
  const void* gate_up_bias = nullptr;
  const void* down_bias = nullptr;
};

// experts[i] holds routing.experts[i]'s matrices (gate_up [2I, H], down [H, I]); weights [T * k]
// float32; x and out [T, H] of dtype xt.
void moe_experts_cpu(const Routing& routing, const std::vector<ExpertMatrices>& experts, const float* weights,
                     uint32_t tokens, uint32_t k, uint64_t H, const void* x, DType xt, const MlpConfig& cfg,
                     void* out);

// The same on the GPU (cuda/moe_experts.cu): device pointers, three launches (per 16 routed experts),
// the assignments passed in the launches' parameters (at most kMaxCudaAssignments of them), a float32
// scratch of moe_experts_cuda_scratch(T x k, H, I) values.
constexpr uint32_t kMaxCudaAssignments = 512;
inline uint64_t moe_experts_cuda_scratch(uint64_t assignments, uint64_t H, uint64_t I) {
  return assignments * (2 * I + H);
}
int moe_experts_cuda(const Routing& routing, const std::vector<ExpertMatrices>& experts, const float* weights,
                     uint32_t tokens, uint32_t k, uint64_t H, const void* x, DType xt, const MlpConfig& cfg,
                     float* scratch, void* out, cudaStream_t stream);

}  // namespace moeoffload
