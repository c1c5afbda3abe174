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
  const auto s = static_cast<cudaStream_t>(stream);
  cudaEvent_t ev = nullptr;
  const char* what = "cudaEventCreateWithFlags (a slot's release)";
  cudaError_t err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
  if (err == cudaSuccess) {
    what = "cudaEventRecord (a slot's release)";
    err = cudaEventRecord(ev, s);
    if (err == cudaSuccess) {
      event_ = ev;
      return;
    }
    cudaEventDestroy(ev);
  }
  // No fence, and the slot is released all the same (the caller forgets its pin): the work queued on
  // the stream, which may still read its bytes, is waited for here, before any copy can write them.
  cudaGetLastError();
  cudaStreamSynchronize(s);
  cuda_check(err, what);
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
