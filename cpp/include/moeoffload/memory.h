// Memory of the two backends. On `cuda`, device memory is cudaMalloc'd and
// host memory is pinned (cudaHostAlloc / cudaHostRegister); on `cpu`, device
// memory is plain host memory and pinning is a no-op, so every runtime object
// runs the same code on a machine without a GPU.
#pragma once
#include <cstddef>
#include <string>

namespace moeoffload {

enum class Backend { Cpu, Cuda };

// "cpu", "cuda", or "auto" (cuda where a GPU is usable, else cpu).
Backend parse_backend(const std::string& name);
const char* backend_name(Backend b);

constexpr size_t kPageSize = 4096;
inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

void* host_alloc(Backend b, size_t bytes);  // page-aligned, pinned on cuda
void host_free(Backend b, void* p);
void host_register(Backend b, void* p, size_t bytes);  // pin memory we did not allocate
void host_unregister(Backend b, void* p);

void* device_alloc(Backend b, size_t bytes);
void device_free(Backend b, void* p);

// Throws Error(Cuda) with the call and CUDA's message when err != 0.
void cuda_check(int err, const char* what);

}  // namespace moeoffload
