// The expert MLP on the GPU: y = down(act(gate(x)) ⊙ up(x)) from two szp matrices in two launches on
// one stream, for one expert or a group of them (moe_experts.cu): the fused szp linear of gate_up
// (x -> float32 [T, 2I] in the caller's scratch), then that of down, whose input is the activation of
// those values with the gate_up bias, computed as it is staged (szp_linear.cu, mlp_gate.h), and whose
// output gets the down bias and x's dtype. Weights are never decoded. The activation math is that of
// the CPU kernel (cpp/kernels/expert_mlp.cpp).
#include <cuda_runtime.h>

#include "moeoffload/szp_cuda.h"

namespace moeoffload {

int expert_mlp_group_cuda(const void* x, DType xt, const uint32_t* row_of, const LinearMember* gate_up,
                          const LinearMember* down, size_t n, const MlpConfig& cfg, float* gu, void* y,
                          cudaStream_t stream) {
  LinearInput rows;
  rows.x = x;
  rows.xt = xt;
  rows.row_of = row_of;
  int err = szp_linear_group_cuda(rows, gate_up, n, gu, DType::F32, stream);
  if (err) return err;
  LinearInput gated;
  gated.x = gu;
  gated.xt = xt;
  gated.gated = true;
  gated.cfg = cfg;
  return szp_linear_group_cuda(gated, down, n, y, xt, stream);
}

int expert_mlp_cuda(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, float* scratch, void* y,
                    cudaStream_t stream) {
  if (tokens == 0) return 0;
  LinearMember gu, dn;
  gu.w = gate_up;
  dn.w = down;
  gu.count = dn.count = tokens;
  dn.gate_up_bias = gate_up_bias;
  dn.bias = down_bias;
  return expert_mlp_group_cuda(x, xt, nullptr, &gu, &dn, 1, cfg, scratch, y, stream);
}

}  // namespace moeoffload
