// The one way the kernels are launched, and their dynamic shared memory: the CUDA syntax under nvcc;
// compiled as C++ (tests/cuda_emulation), the CPU emulator's, so the kernels and the host code that
// launches them run unchanged on a machine with no GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moeoffload {

// kernel<<<grid, block, shared_bytes, stream>>>(args...), then the launch's error (a cudaError_t).
template <typename... Params, typename... Args>
int launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                  const Args&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  return static_cast<int>(cudaGetLastError());
#else
  return moeoffload_emulation::launch_on(stream, grid, block, shared_bytes, kernel, args...);
#endif
}

// Whether a buffer the kernels read with 8-byte loads (szp's and szpe's u64 offset tables) is not
// 8-aligned: a GPU faults on such a load and the context is lost, so the entry points refuse it
// (cudaErrorMisalignedAddress) before they launch.
inline bool misaligned8(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 7) != 0; }

}  // namespace moeoffload

// `type* name`: the block's dynamic shared memory (its size is the launch's shared_bytes).
#if defined(__CUDACC__)
#define MOEOFFLOAD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#define MOEOFFLOAD_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(moeoffload_emulation::dynamic_shared())
#endif
