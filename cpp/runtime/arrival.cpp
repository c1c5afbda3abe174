#include "moeoffload/arrival.h"

#include <cstring>
#include <string>
#include <vector>

#include "moeoffload/errors.h"
#include "moeoffload/szpe.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>

#include "moeoffload/szpe_cuda.h"
#endif

namespace moeoffload {

Expand arrival_for(const ExpertStore& store, uint32_t id, Backend backend) {
  if (!store.coded(id)) return {};
  std::vector<MatrixInfo> matrices = store.matrices(id);
  if (backend == Backend::Cpu)
    return [matrices](const uint8_t* src, uint8_t* dst, void*, int*) {
      for (const MatrixInfo& m : matrices) {
        if (m.coding == Coding::Szpe)
          szpe_to_szp_into(src + m.host_offset, m.coded, dst + m.offset);
        else
          std::memcpy(dst + m.offset, src + m.host_offset, m.bytes);
      }
    };
#if MOEOFFLOAD_WITH_CUDA
  return [matrices, id](const uint8_t* src, uint8_t* dst, void* stream, int* device_failed) {
    auto s = static_cast<cudaStream_t>(stream);
    auto check = [id](int err) {
      if (err == cudaSuccess) return;
      cudaGetLastError();  // read here: else the next launch on this thread returns it, failing another expert
      throw Error(ErrorKind::Cuda, "the arrival of expert " + std::to_string(id) + " failed: " +
                                         cudaGetErrorString(static_cast<cudaError_t>(err)));
    };
    std::vector<SzpeTranscode> transcodes;  // one launch for all of them: their streams run side by side
    for (const MatrixInfo& m : matrices) {
      if (m.coding == Coding::Szpe)
        transcodes.push_back(SzpeTranscode{m.coded, src + m.host_offset, dst + m.offset});
      else
        check(cudaMemcpyAsync(dst + m.offset, src + m.host_offset, m.bytes, cudaMemcpyDeviceToDevice, s));
    }
    check(szpe_to_szp_cuda(transcodes.data(), static_cast<int>(transcodes.size()), device_failed, s));
  };
#else
  throw Error(ErrorKind::Cuda, "the cuda backend needs a build with CUDA");
#endif
}

}  // namespace moeoffload
