// The gated activation of an expert MLP, act(gate) * up, written once for the CPU kernel
// (cpp/kernels/expert_mlp.cpp) and the GPU one (cuda/szp_linear.cu computes it while staging the
// down projection's input), so both backends apply the same formulas.
#pragma once
#include <math.h>

#include "moeoffload/cpu_kernels.h"
#include "moeoffload/dtype.h"

namespace moeoffload {

MOEOFFLOAD_HD float sigmoid_of(float v) { return 1.0f / (1.0f + expf(-v)); }

// g and u already carry their biases.
MOEOFFLOAD_HD float gated_value(float g, float u, const MlpConfig& c) {
  switch (c.act) {
    case Activation::Silu: return g * sigmoid_of(g) * u;
    case Activation::Gelu: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)) * u;
    case Activation::GeluTanh: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
    case Activation::Relu: return (g > 0.0f ? g : 0.0f) * u;
    case Activation::GptOss: {
      g = c.limit < g ? c.limit : g;  // std::min(g, limit) and std::min(std::max(u, -limit), limit),
      // NaN included
      u = u < -c.limit ? -c.limit : u > c.limit ? c.limit : u;
      return (u + 1.0f) * (g * sigmoid_of(g * c.alpha));
    }
  }
  return 0.0f;
}

}  // namespace moeoffload
