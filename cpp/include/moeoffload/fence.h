// A point in a CUDA stream's work: everything queued on the stream before the fence was recorded.
// The device cache keeps one on the bytes of a slot released by a caller whose kernels, queued on its
// stream, may still read them (DeviceCache::release with a stream); a copy that later lands in those
// bytes makes its copy stream wait for the fence first (TransferEngine::copy's `after`), so nothing is
// overwritten under a running kernel and no host thread waits. cuda only: on the cpu backend the
// kernels have run when their call returns, and no fence is ever made.
#pragma once
#include <cstdint>
#include <memory>

namespace moeoffload {

class Fence {
 public:
  // Records a new event on `stream` (a cudaStream_t). When CUDA refuses, waits on the host for the
  // stream's work so far (what the fence would have stood for), then throws Error(Cuda).
  explicit Fence(void* stream);
  ~Fence();
  Fence(const Fence&) = delete;
  Fence& operator=(const Fence&) = delete;
  // Makes `stream` wait for the fence (the device waits, not the host).
  void order(void* stream) const;
  // True once the device has passed it.
  bool passed() const;
  // Waits on the host until the device has passed it (a failed copy's last resort); errors are ignored.
  void wait() const;

 private:
  void* event_ = nullptr;  // cudaEvent_t, this fence's own (one record, never reused)
  uint64_t generation_;    // fork_generation() when made: a forked child leaks the event (no CUDA there)
};

}  // namespace moeoffload
