// The CUDA entry points of cuda/*.cu, compiled as C++ against the CPU emulator (cuda_runtime.h here),
// behind a C interface for ctypes: tests/cuda_emulation/checks.py calls them on host arrays (device
// memory is host memory here) and compares with the CPU kernels. Each returns 0, a cudaError_t, or -1
// with the reason in emu_error() (a buffer that does not parse, a shape the op refuses).
#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "moeoffload/errors.h"
#include "moeoffload/moe_experts.h"
#include "moeoffload/szp_cuda.h"
#include "moeoffload/szpe_cuda.h"

using namespace moeoffload;

namespace {

thread_local std::string last_error;

// f's launches run on the default stream's worker: each entry point returns after they have.
template <typename F>
int guarded(F&& f) {
  try {
    const int rc = f();
    cudaDeviceSynchronize();
    return rc;
  } catch (const std::exception& e) {
    cudaDeviceSynchronize();
    last_error = e.what();
    return -1;
  }
}

SzpMatrix matrix(const uint8_t* buf, uint64_t len) { return szp_matrix(buf, szp_parse(buf, len, true)); }

MlpConfig mlp_config(int act, int layout, float alpha, float limit) {
  MlpConfig cfg;
  cfg.act = static_cast<Activation>(act);
  cfg.layout = static_cast<GateLayout>(layout);
  cfg.alpha = alpha;
  cfg.limit = limit;
  return cfg;
}

}  // namespace

extern "C" {

const char* emu_error() { return last_error.c_str(); }

int emu_szp_decode(const uint8_t* buf, uint64_t len, void* out) {
  return guarded([&] { return szp_decode_cuda(szp_parse(buf, len, true), buf, out, nullptr); });
}

int emu_szpe_to_szp(const uint8_t* buf, uint64_t len, uint8_t* out, int* failed) {
  return guarded([&] { return szpe_to_szp_cuda(szpe_parse(buf, len, true), buf, out, failed, nullptr); });
}

int emu_szpe_values(const uint8_t* buf, uint64_t len, void* out, int* failed) {
  return guarded([&] { return szpe_decode_values_cuda(szpe_parse(buf, len, true), buf, out, failed, nullptr); });
}

int emu_szp_linear(const uint8_t* w, uint64_t w_len, const void* x, int xt, uint32_t tokens, void* y) {
  return guarded([&] { return szp_linear_cuda(matrix(w, w_len), x, static_cast<DType>(xt), tokens, y, nullptr); });
}

int emu_expert_mlp(const uint8_t* gu, uint64_t gu_len, const uint8_t* dn, uint64_t dn_len, const void* x, int xt,
                   uint32_t tokens, int act, int layout, float alpha, float limit, const void* gu_bias,
                   const void* dn_bias, float* scratch, void* y) {
  return guarded([&] {
    return expert_mlp_cuda(matrix(gu, gu_len), matrix(dn, dn_len), x, static_cast<DType>(xt), tokens,
                           mlp_config(act, layout, alpha, limit), gu_bias, dn_bias, scratch, y, nullptr);
  });
}

int emu_moe_experts(uint32_t n_experts, const uint8_t* const* gu, const uint64_t* gu_len, const uint8_t* const* dn,
                    const uint64_t* dn_len, const void* const* gu_bias, const void* const* dn_bias,
                    const int64_t* index, uint32_t tokens, uint32_t k, const float* weights, const void* x, int xt,
                    int act, int layout, float alpha, float limit, float* scratch, void* out) {
  return guarded([&] {
    const Routing routing = group_routing(index, tokens, k, n_experts);
    std::vector<ExpertMatrices> experts;
    for (uint32_t e : routing.experts)
      experts.push_back(ExpertMatrices{matrix(gu[e], gu_len[e]), matrix(dn[e], dn_len[e]),
                                       gu_bias ? gu_bias[e] : nullptr, dn_bias ? dn_bias[e] : nullptr});
    const uint64_t H = experts.empty() ? 0 : experts.front().gate_up.cols;
    return moe_experts_cuda(routing, experts, weights, tokens, k, H, x, static_cast<DType>(xt),
                            mlp_config(act, layout, alpha, limit), scratch, out, nullptr);
  });
}

}  // extern "C"
