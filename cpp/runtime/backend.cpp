#include "moeoffload/backend.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moeoffload {

BackendInfo query_backend() {
  BackendInfo info;
#if MOEOFFLOAD_WITH_CUDA
  info.built_with_cuda = true;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.reason = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return info;
  }
  info.device_count = count;
  if (count == 0) {
    info.reason = "no CUDA device";
    return info;
  }
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    info.reason = "cudaGetDeviceProperties failed";
    cudaGetLastError();
    return info;
  }
  info.gpu_available = true;
  info.device_name = prop.name;
  info.compute_capability_major = prop.major;
  info.compute_capability_minor = prop.minor;
#else
  info.reason = "built without CUDA";
#endif
  return info;
}

}  // namespace moeoffload
