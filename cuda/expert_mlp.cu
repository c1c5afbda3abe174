// The expert MLP on the GPU: y = down(act(gate(x)) ⊙ up(x)) from two szp
// matrices in three launches on one stream: the fused szp linear of gate_up
// (x -> float32 [T, 2I]), an elementwise kernel for the bias and the gated
// activation (-> float32 [T, I]), the fused szp linear of down (-> float32
// [T, H]) and a last elementwise pass for the down bias and the rounding to
// x's dtype. Weights are never decoded; the intermediates live in a float32
// scratch of T x (3I + H) values the caller provides. The activation math is
// that of the CPU kernel (cpp/kernels/expert_mlp.cpp).
#include <cuda_runtime.h>

#include "moeoffload/szp_cuda.h"

namespace moeoffload {

namespace {

template <DType T>
__device__ __forceinline__ float bias_at(const void* b, uint64_t i) {
  return Stored<T>::to_f32(static_cast<const typename Stored<T>::type*>(b)[i]);
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

template <DType T>
__global__ void gate_kernel(const float* gu, const void* bias, uint64_t tokens, uint64_t I, MlpConfig c, float* h) {
  const uint64_t n = tokens * I;
  for (uint64_t k = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t t = k / I, j = k % I;
    const bool inter = c.layout == GateLayout::Interleaved;
    const uint64_t gi = inter ? 2 * j : j, ui = inter ? 2 * j + 1 : I + j;
    float g = gu[t * 2 * I + gi], u = gu[t * 2 * I + ui];
    if (bias) {
      g += bias_at<T>(bias, gi);
      u += bias_at<T>(bias, ui);
    }
    float out;
    switch (c.act) {
      case Activation::Silu: out = g * sigmoidf(g) * u; break;
      case Activation::Gelu: out = 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)) * u; break;
      case Activation::GeluTanh:
        out = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
        break;
      case Activation::Relu: out = fmaxf(g, 0.0f) * u; break;
      default: {
        g = fminf(g, c.limit);
        u = fminf(fmaxf(u, -c.limit), c.limit);
        out = (u + 1.0f) * (g * sigmoidf(g * c.alpha));
      }
    }
    h[k] = out;
  }
}

template <DType T>
__global__ void finish_kernel(const float* yf, const void* bias, uint64_t tokens, uint64_t H, void* y) {
  const uint64_t n = tokens * H;
  auto* out = static_cast<typename Stored<T>::type*>(y);
  for (uint64_t k = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<uint64_t>(gridDim.x) * blockDim.x)
    out[k] = Stored<T>::from_f32(yf[k] + (bias ? bias_at<T>(bias, k % H) : 0.0f));
}

unsigned grid_for(uint64_t n) { return static_cast<unsigned>(n / 256 + 1 < 65535 ? n / 256 + 1 : 65535); }

template <DType T>
int run(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, uint32_t tokens, const MlpConfig& cfg,
        const void* gate_up_bias, const void* down_bias, float* scratch, void* y, cudaStream_t stream) {
  const uint64_t I = down.cols, H = down.rows;
  float* gu = scratch;
  float* h = gu + tokens * 2 * I;
  float* yf = h + tokens * I;
  int err = szp_linear_cuda_typed(gate_up, x, T, tokens, gu, DType::F32, stream);
  if (err) return err;
  gate_kernel<T><<<grid_for(tokens * I), 256, 0, stream>>>(gu, gate_up_bias, tokens, I, cfg, h);
  if ((err = static_cast<int>(cudaGetLastError()))) return err;
  err = szp_linear_cuda_typed(down, h, DType::F32, tokens, yf, DType::F32, stream);
  if (err) return err;
  finish_kernel<T><<<grid_for(tokens * H), 256, 0, stream>>>(yf, down_bias, tokens, H, y);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int expert_mlp_cuda(const SzpMatrix& gate_up, const SzpMatrix& down, const void* x, DType xt, uint32_t tokens,
                    const MlpConfig& cfg, const void* gate_up_bias, const void* down_bias, float* scratch, void* y,
                    cudaStream_t stream) {
  if (tokens == 0) return 0;
  switch (xt) {
    case DType::F32: return run<DType::F32>(gate_up, down, x, tokens, cfg, gate_up_bias, down_bias, scratch, y, stream);
    case DType::BF16: return run<DType::BF16>(gate_up, down, x, tokens, cfg, gate_up_bias, down_bias, scratch, y, stream);
    case DType::F16: return run<DType::F16>(gate_up, down, x, tokens, cfg, gate_up_bias, down_bias, scratch, y, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace moeoffload
