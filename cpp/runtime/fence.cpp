#include "moeoffload/fence.h"

#include "moeoffload/errors.h"
#include "moeoffload/fork.h"
#include "moeoffload/memory.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moeoffload {

#if MOEOFFLOAD_WITH_CUDA
Fence::Fence(void* stream) : generation_(fork_generation()) {
  cudaEvent_t ev = nullptr;
  cuda_check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  event_ = ev;
  const cudaError_t err = cudaEventRecord(ev, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    cudaEventDestroy(ev);
    event_ = nullptr;
    cuda_check(err, "cudaEventRecord (a slot's release)");
  }
}

Fence::~Fence() {
  if (event_ && generation_ == fork_generation()) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

void Fence::order(void* stream) const {
  cuda_check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0),
             "cudaStreamWaitEvent (a released slot's fence)");
}

bool Fence::passed() const {
  const cudaError_t r = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (r != cudaSuccess) cudaGetLastError();  // "not ready" would be the thread's last error: the next launch's
  return r == cudaSuccess;
}

void Fence::wait() const {
  if (cudaEventSynchronize(static_cast<cudaEvent_t>(event_)) != cudaSuccess) cudaGetLastError();
}
#else
Fence::Fence(void*) : generation_(0) { throw Error(ErrorKind::Cuda, "a stream fence needs a build with CUDA"); }
Fence::~Fence() = default;
void Fence::order(void*) const {}
bool Fence::passed() const { return true; }
void Fence::wait() const {}
#endif

}  // namespace moeoffload
