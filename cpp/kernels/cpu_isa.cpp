#include "moeoffload/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace moeoffload {

CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
    return avx512 ? CpuIsa::Avx512 : avx2 ? CpuIsa::Avx2 : CpuIsa::Portable;
  }();
  return best;
#else
  return CpuIsa::Portable;
#endif
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = cpu_isa_supported();
    const char* cap = std::getenv("MOEOFFLOAD_ISA");
    CpuIsa want = best;
    if (cap && std::strcmp(cap, "portable") == 0) want = CpuIsa::Portable;
    else if (cap && std::strcmp(cap, "avx2") == 0) want = CpuIsa::Avx2;
    return static_cast<int>(want) < static_cast<int>(best) ? want : best;
  }();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::Avx512 ? "avx512" : isa == CpuIsa::Avx2 ? "avx2" : "portable";
}

}  // namespace moeoffload
