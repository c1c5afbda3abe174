// Fused expert MLP on the CPU: y = down(act(gate(x)) ⊙ up(x)) from two szp
// matrices, the gate/up product and the activation in float32, never a
// decoded weight. The two projections are szp_linear_f32; between them the
// activation runs on a [T, I] float32 scratch (zero padded to whole blocks, as
// the down projection reads it).
#include <string>
#include <vector>

#include "convert.h"
#include "moeoffload/cpu_kernels.h"
#include "moeoffload/errors.h"
#include "moeoffload/mlp_gate.h"

namespace moeoffload {

namespace {

void add_bias(float* y, uint32_t tokens, uint64_t n, uint64_t ld, const void* bias, DType t) {
  if (!bias) return;
  std::vector<float> b(n);
  to_f32(bias, t, n, b.data());
  for (uint32_t i = 0; i < tokens; ++i)
    for (uint64_t j = 0; j < n; ++j) y[i * ld + j] += b[j];
}

}  // namespace

void expert_mlp_cpu(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, void* y) {
  const uint64_t H = gate_up.cols, I = down.cols;
  if (gate_up.rows != 2 * I || down.rows != H)
    throw Error(ErrorKind::Shape, "expert_mlp needs gate_up [2I, H] and down [H, I]; got gate_up [" +
                                      std::to_string(gate_up.rows) + ", " + std::to_string(H) + "] and down [" +
                                      std::to_string(down.rows) + ", " + std::to_string(I) + "]");
  if (tokens == 0) return;
  uint64_t ldx;
  std::vector<float> xf = padded_f32(x, xt, tokens, H, &ldx);
  std::vector<float> gu(static_cast<size_t>(tokens) * 2 * I);
  szp_linear_f32(gate_up, xf.data(), ldx, tokens, gu.data(), 2 * I);
  add_bias(gu.data(), tokens, 2 * I, 2 * I, gate_up_bias, xt);

  const uint64_t ldh = (I + kSzpBlock - 1) / kSzpBlock * kSzpBlock;
  std::vector<float> h(static_cast<size_t>(tokens) * ldh, 0.0f);
  const bool interleaved = cfg.layout == GateLayout::Interleaved;
  for (uint32_t t = 0; t < tokens; ++t) {
    const float* row = gu.data() + t * 2 * I;
    for (uint64_t j = 0; j < I; ++j) {
      const float g = interleaved ? row[2 * j] : row[j];
      const float u = interleaved ? row[2 * j + 1] : row[I + j];
      h[t * ldh + j] = gated_value(g, u, cfg);
    }
  }
  std::vector<float> yf(static_cast<size_t>(tokens) * H);
  szp_linear_f32(down, h.data(), ldh, tokens, yf.data(), H);
  add_bias(yf.data(), tokens, H, H, down_bias, xt);
  from_f32(yf.data(), yf.size(), xt, y);
}

}  // namespace moeoffload
