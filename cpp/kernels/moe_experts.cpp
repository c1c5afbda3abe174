// One MoE layer's routed experts on the CPU (moe_experts.h): the routing grouped by expert, each
// expert's fused MLP on its tokens' rows, the weighted outputs added in x's dtype (each term and each
// sum rounded, as transformers' eager loop adds them). Built with -ffp-contract=off (CMakeLists.txt):
// a fused multiply-add would round once where that loop rounds twice.
#include "moeoffload/moe_experts.h"

#include <cstring>
#include <string>

#include "convert.h"
#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"

namespace moeoffload {

Routing group_routing(const int64_t* index, uint32_t tokens, uint32_t k, uint32_t num_experts) {
  const uint64_t n = static_cast<uint64_t>(tokens) * k;
  std::vector<uint32_t> count(num_experts, 0);
  for (uint64_t a = 0; a < n; ++a) {
    if (index[a] < 0 || index[a] >= static_cast<int64_t>(num_experts))
      throw Error(ErrorKind::InvalidArgument, "routed expert " + std::to_string(index[a]) + " (token " +
                                                  std::to_string(a / k) + ") is out of range: the layer has " +
                                                  std::to_string(num_experts) + " experts");
    ++count[index[a]];
    for (uint64_t b = a - a % k; b < a; ++b)
      if (index[b] == index[a])
        throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(index[a]) + " is routed twice for token " +
                                                    std::to_string(a / k));
  }
  Routing r;
  std::vector<uint32_t> at(num_experts, 0);
  r.first.push_back(0);
  for (uint32_t e = 0; e < num_experts; ++e) {
    if (!count[e]) continue;
    at[e] = r.first.back();
    r.experts.push_back(e);
    r.first.push_back(r.first.back() + count[e]);
  }
  r.order.resize(n);
  for (uint64_t a = 0; a < n; ++a) r.order[at[index[a]]++] = static_cast<uint32_t>(a);  // tokens ascending
  return r;
}

void moe_experts_cpu(const Routing& routing, const std::vector<ExpertMatrices>& experts, const float* weights,
                     uint32_t tokens, uint32_t k, uint64_t H, const void* x, DType xt, const MlpConfig& cfg,
                     void* out) {
  if (tokens == 0) return;
  const size_t es = static_cast<size_t>(dtype_size(xt));
  // Each expert into its own output rows. With enough work, the experts in parallel (a decode step's
  // experts split by rows leave the cores waiting at every matrix: one expert a thread is 1.35-1.4x
  // faster on a Qwen3-30B-A3B-shaped layer here); the matrices' row-parallel loops then run inline
  // (parallel.h). Below about 2^19 multiply-adds a thread's wake-up costs more than it saves (the
  // shipped model's decode step: 0.17M), and the experts run one after another.
  uint64_t macs = 0;
  for (size_t i = 0; i < routing.experts.size(); ++i)
    macs += static_cast<uint64_t>(routing.first[i + 1] - routing.first[i]) *
            (experts[i].gate_up.rows * experts[i].gate_up.cols + experts[i].down.rows * experts[i].down.cols);
  std::vector<std::vector<uint8_t>> ys(routing.experts.size());
  const auto run = [&](uint64_t i0, uint64_t i1) {
    std::vector<uint8_t> xe;
    for (uint64_t i = i0; i < i1; ++i) {
      const ExpertMatrices& m = experts[i];
      const uint32_t a0 = routing.first[i], n = routing.first[i + 1] - a0;
      const uint32_t* assigned = routing.order.data() + a0;
      // Every token in order (the decode step's one token, or a batch routed entirely here): x itself.
      bool all = n == tokens;
      for (uint32_t r = 0; all && r < n; ++r) all = assigned[r] / k == r;
      const void* rows = x;
      if (!all) {
        xe.resize(n * H * es);
        for (uint32_t r = 0; r < n; ++r)
          memcpy(xe.data() + r * H * es, static_cast<const uint8_t*>(x) + (assigned[r] / k) * H * es, H * es);
        rows = xe.data();
      }
      ys[i].resize(n * H * es);
      expert_mlp_cpu(m.gate_up, m.down, rows, xt, n, cfg, m.gate_up_bias, m.down_bias, ys[i].data());
    }
  };
  if (macs >= (uint64_t{1} << 19) && routing.experts.size() > 1)
    parallel_for(routing.experts.size(), 1, run);
  else
    run(0, routing.experts.size());
  // The weighted sum in expert order, as the eager loop adds (each term and each sum rounded).
  std::vector<float> acc(static_cast<size_t>(tokens) * H, 0.0f);  // values of x's dtype, held as float
  std::vector<float> yf(H);
  for (size_t i = 0; i < routing.experts.size(); ++i) {
    const uint32_t a0 = routing.first[i], n = routing.first[i + 1] - a0;
    const uint32_t* assigned = routing.order.data() + a0;
    for (uint32_t r = 0; r < n; ++r) {
      to_f32(ys[i].data() + r * H * es, xt, H, yf.data());
      const float w = weights[assigned[r]];
      float* dst = acc.data() + static_cast<size_t>(assigned[r] / k) * H;
      for (uint64_t h = 0; h < H; ++h) dst[h] = rounded_to(dst[h] + rounded_to(w * yf[h], xt), xt);
    }
  }
  from_f32(acc.data(), acc.size(), xt, out);
}

}  // namespace moeoffload
