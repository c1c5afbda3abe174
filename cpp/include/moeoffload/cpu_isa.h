// Which SIMD path the CPU kernels take, chosen once at run time: AVX-512
// (F/BW/VL/DQ, with BMI2), AVX2 (+FMA, F16C) or the portable C++ path. MOEOFFLOAD_ISA =
// avx512 | avx2 | portable caps the choice (tests run every path this machine
// has and compare them).
#pragma once

namespace moeoffload {

enum class CpuIsa { Portable = 0, Avx2 = 1, Avx512 = 2 };

CpuIsa cpu_isa();                 // the path in use
CpuIsa cpu_isa_supported();       // the best this CPU offers
const char* cpu_isa_name(CpuIsa isa);

}  // namespace moeoffload
