#include "moeoffload/memory.h"

#include <cstdlib>
#include <new>

#include "moeoffload/backend.h"
#include "moeoffload/errors.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moeoffload {

Backend parse_backend(const std::string& name) {
  if (name == "cpu") return Backend::Cpu;
  if (name == "cuda" || name == "auto") {
    BackendInfo info = query_backend();
    if (info.gpu_available) return Backend::Cuda;
    if (name == "auto") return Backend::Cpu;
    throw Error(ErrorKind::Cuda, "backend 'cuda' requested but no GPU is usable: " + info.reason);
  }
  throw Error(ErrorKind::InvalidArgument, "unknown backend '" + name + "' (expected cpu, cuda or auto)");
}

const char* backend_name(Backend b) { return b == Backend::Cuda ? "cuda" : "cpu"; }

void cuda_check(int err, const char* what) {
#if MOEOFFLOAD_WITH_CUDA
  if (err != 0) {
    cudaGetLastError();
    throw Error(ErrorKind::Cuda, std::string(what) + " failed: " + cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
#else
  if (err != 0) throw Error(ErrorKind::Cuda, std::string(what) + " failed (built without CUDA)");
#endif
}

namespace {
void* aligned_host(size_t bytes) {
  void* p = std::aligned_alloc(kPageSize, round_up(bytes == 0 ? 1 : bytes, kPageSize));
  if (!p) throw std::bad_alloc();
  return p;
}
#if !MOEOFFLOAD_WITH_CUDA
[[noreturn]] void no_cuda() { throw Error(ErrorKind::Cuda, "the cuda backend needs a build with CUDA"); }
#endif
}  // namespace

void* host_alloc(Backend b, size_t bytes) {
  if (b == Backend::Cpu) return aligned_host(bytes);
#if MOEOFFLOAD_WITH_CUDA
  void* p = nullptr;
  cuda_check(cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocPortable), "cudaHostAlloc");
  return p;
#else
  no_cuda();
#endif
}

void host_free(Backend b, void* p) {
  if (!p) return;
  if (b == Backend::Cpu) return std::free(p);
#if MOEOFFLOAD_WITH_CUDA
  cudaFreeHost(p);
#endif
}

void host_register(Backend b, void* p, size_t bytes) {
  if (b == Backend::Cpu || bytes == 0) return;
#if MOEOFFLOAD_WITH_CUDA
  // Read-only: the table file is mapped PROT_READ.
  cuda_check(cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly), "cudaHostRegister");
#else
  no_cuda();
#endif
}

void host_unregister(Backend b, void* p) {
  if (b == Backend::Cpu || !p) return;
#if MOEOFFLOAD_WITH_CUDA
  cudaHostUnregister(p);
#endif
}

void* device_alloc(Backend b, size_t bytes) {
  if (b == Backend::Cpu) return aligned_host(bytes);
#if MOEOFFLOAD_WITH_CUDA
  void* p = nullptr;
  cuda_check(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");
  return p;
#else
  no_cuda();
#endif
}

void device_free(Backend b, void* p) {
  if (!p) return;
  if (b == Backend::Cpu) return std::free(p);
#if MOEOFFLOAD_WITH_CUDA
  cudaFree(p);
#endif
}

}  // namespace moeoffload
