// Stands in for CUDA's cuda_runtime.h when cuda/*.cu and the runtime's CUDA paths compile as C++
// against the CPU emulator (cuda_emulator.h): the types, error codes and the runtime calls they use.
//
// Device memory is host memory: cudaMalloc'd bytes start poisoned (0xA5), so a kernel or copy that
// reads what nobody wrote gives garbage, and AddressSanitizer sees every access. Every stream, the
// default (null) one included, is a worker thread running its work in order, each item after a random
// pause of up to half a millisecond, so host code that reads a copy's destination, reuses its source
// or frees a buffer before it synchronises sees the wrong bytes (or ASan a use after free), as it
// would on a GPU. (The default stream does not synchronise with the others: every stream the code
// makes is non-blocking.) Kernels launched on a stream (cuda/launch.cuh) run on its worker, one kernel
// at a time across all streams (the emulator's state is global). Events complete when the stream
// reaches them; a host thread waiting for one resumes late, the streams going on meanwhile.
// cudaStreamDestroy returns at once, the stream's queued work still runs, and the next stream created
// gets the same handle back (as CUDA's handles are reused); an event destroyed under queued work lives
// until that work is done. As in CUDA, an error (a query's "not ready" too) is the thread's last error
// until cudaGetLastError reads it, and a launch returns the last error. A check can make one call fail
// (fail_call: the nth call of a runtime function from then on), to reach the error paths of the code
// that calls it.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "cuda_emulator.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotReady = 600,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocPortable = 1;
constexpr unsigned cudaHostRegisterPortable = 1;
constexpr unsigned cudaHostRegisterReadOnly = 8;

struct cudaDeviceProp {
  char name[256];
  int major, minor;
};

namespace moeoffload_emulation {

// A stream: its work in order on a thread of its own.
struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> work;
  bool stopping = false, busy = false;
  uint64_t seed;
  std::thread thread;

  explicit Stream(uint64_t s) : seed(s) {
    thread = std::thread([this] { run(); });
  }
  void run() {
    for (;;) {
      std::function<void()> item;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || !work.empty(); });
        if (work.empty()) return;
        item = std::move(work.front());
        work.pop_front();
        busy = true;
      }
      seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
      std::this_thread::sleep_for(std::chrono::microseconds(seed % 500));
      item();
      {
        std::lock_guard<std::mutex> lock(mu);
        busy = false;
      }
      cv.notify_all();
    }
  }
  void push(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lock(mu);
      work.push_back(std::move(f));
    }
    cv.notify_all();
  }
  void drain() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return work.empty() && !busy; });
  }
  // cudaStreamDestroy: the work already queued still runs, then the thread ends
  void retire() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
  }
  bool drained() {
    std::lock_guard<std::mutex> lock(mu);
    return work.empty() && !busy;
  }
  ~Stream() {
    retire();
    thread.join();
  }
};

// What a cudaStream_t points at: the stream it names now. A destroyed stream's handle names the next
// stream created.
struct StreamHandle {
  Stream* stream = nullptr;
};

struct Event {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, reached = 0;  // records issued, and the last one its stream reached
};

// What a cudaEvent_t points at. Work queued on a stream holds the event itself, so an event destroyed
// before its stream reaches a record or a wait of it lives until then, as cudaEventDestroy allows.
struct EventHandle {
  std::shared_ptr<Event> event = std::make_shared<Event>();
};
inline std::shared_ptr<Event> event_of(void* e) { return static_cast<EventHandle*>(e)->event; }

inline Stream& default_stream() {
  static Stream s(0x6A09E667F3BCC908ull);
  return s;
}

// The streams made by cudaStreamCreate, alive or destroyed with work still queued (cudaDeviceSynchronize
// drains them all), and the handles of destroyed streams, for the next streams created. Under streams_mutex.
inline std::mutex& streams_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<Stream*>& live_streams() {
  static std::vector<Stream*> v;
  return v;
}
inline std::vector<Stream*>& retired_streams() {
  static std::vector<Stream*> v;
  return v;
}
inline std::vector<StreamHandle*>& free_handles() {
  static std::vector<StreamHandle*> v;
  return v;
}

inline Stream& stream_of(void* stream) {
  return stream ? *static_cast<StreamHandle*>(stream)->stream : default_stream();
}

// Runs f on the stream's worker (the null stream is the default stream's).
inline void enqueue(void* stream, std::function<void()> f) { stream_of(stream).push(std::move(f)); }

inline int& last_error() {
  thread_local int e = 0;
  return e;
}

// A host thread that waited for the device resumes after a random pause, up to 1.5 ms and one time in
// two up to late_wake_us() (20 ms unless a check sets it), as one the OS runs late would, while the
// streams go on: whatever the host reads then may have been written again by work queued after the
// point it waited for (an emulated kernel takes tens of milliseconds).
inline std::atomic<uint32_t>& late_wake_us() {
  static std::atomic<uint32_t> us{20000};
  return us;
}
inline void host_wakes_late() {
  thread_local uint64_t seed = 0x3C6EF372FE94F82Bull ^ std::hash<std::thread::id>()(std::this_thread::get_id());
  seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
  const uint64_t most = seed % 2 ? late_wake_us().load() : 1500;
  std::this_thread::sleep_for(std::chrono::microseconds((seed >> 8) % (most + 1)));
}

// One call made to fail: the nth call of `name` (a runtime function, or "launch") from when it was set,
// counting only calls not made under Uncounted (a check's own work on the device).
struct FaultPlan {
  std::mutex mu;
  std::string name;
  int countdown = 0;
  int fired = 0;
};
inline FaultPlan& fault_plan() {
  static FaultPlan p;
  return p;
}
inline bool& uncounted() {
  thread_local bool u = false;
  return u;
}
class Uncounted {
 public:
  Uncounted() : was_(uncounted()) { uncounted() = true; }
  ~Uncounted() { uncounted() = was_; }

 private:
  bool was_;
};
inline void fail_call(const std::string& name, int nth) {  // nth 0: none fails from now on
  FaultPlan& p = fault_plan();
  std::lock_guard<std::mutex> lock(p.mu);
  p.name = name;
  p.countdown = nth;
  p.fired = 0;
}
inline int fault_fired() {
  FaultPlan& p = fault_plan();
  std::lock_guard<std::mutex> lock(p.mu);
  return p.fired;
}
// True when this call of `name` is the one to fail: `error` is then the thread's last error, as CUDA's are.
inline bool fails(const char* name, int error = 719 /* cudaErrorLaunchFailure */) {
  if (uncounted()) return false;
  FaultPlan& p = fault_plan();
  std::lock_guard<std::mutex> lock(p.mu);
  if (p.countdown <= 0 || p.name != name || --p.countdown > 0) return false;
  p.fired += 1;
  last_error() = error;
  return true;
}

inline std::mutex& kernel_mutex() {
  static std::mutex m;
  return m;
}

// cuda/launch.cuh's launch: the kernel's arguments copied now, as a launch copies its parameters.
template <typename... Params, typename... Args>
int launch_on(void* stream, dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...),
              const Args&... args) {
  if (fails("launch")) {
    last_error() = 0;
    return 719;
  }
  enqueue(stream, [=] {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    launch(grid, block, shared_bytes, kernel, args...);
  });
  const int e = last_error();  // a launch returns cudaGetLastError()
  last_error() = 0;
  return e;
}

}  // namespace moeoffload_emulation

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

inline cudaError_t cudaGetLastError() {
  const auto e = static_cast<cudaError_t>(moeoffload_emulation::last_error());
  moeoffload_emulation::last_error() = 0;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated)";
    case cudaErrorNotReady: return "device not ready (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated, injected)";
    default: return "an error (emulated)";
  }
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidValue;
  std::memset(p, 0, sizeof(*p));
  std::strcpy(p->name, "CUDA emulator");
  p->major = 9, p->minor = 0;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (moeoffload_emulation::fails("cudaMalloc", cudaErrorMemoryAllocation)) return cudaErrorMemoryAllocation;
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xA5, bytes);
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  if (moeoffload_emulation::fails("cudaHostAlloc", cudaErrorMemoryAllocation)) return cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaHostAlloc(p, bytes, 0); }
template <typename T>
cudaError_t cudaMallocHost(T** p, size_t bytes) {
  return cudaHostAlloc(reinterpret_cast<void**>(p), bytes, 0);
}
inline cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaHostRegister(void*, size_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaHostUnregister(void*) { return cudaSuccess; }

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  using namespace moeoffload_emulation;
  static uint64_t seeds = 0x2545F4914F6CDD1Dull;
  std::lock_guard<std::mutex> lock(streams_mutex());
  auto& retired = retired_streams();
  for (auto it = retired.begin(); it != retired.end();) {  // those whose work has run end here
    if ((*it)->drained()) {
      delete *it;
      it = retired.erase(it);
    } else {
      ++it;
    }
  }
  StreamHandle* handle = free_handles().empty() ? new StreamHandle : free_handles().back();
  if (!free_handles().empty()) free_handles().pop_back();
  handle->stream = new Stream(seeds += 0x9E3779B97F4A7C15ull);
  live_streams().push_back(handle->stream);
  *s = reinterpret_cast<cudaStream_t>(handle);
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  using namespace moeoffload_emulation;
  auto* handle = reinterpret_cast<StreamHandle*>(s);
  std::lock_guard<std::mutex> lock(streams_mutex());
  auto& live = live_streams();
  live.erase(std::find(live.begin(), live.end(), handle->stream));
  handle->stream->retire();
  retired_streams().push_back(handle->stream);
  handle->stream = nullptr;
  free_handles().push_back(handle);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (moeoffload_emulation::fails("cudaStreamSynchronize", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  moeoffload_emulation::stream_of(s).drain();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  moeoffload_emulation::default_stream().drain();
  std::lock_guard<std::mutex> lock(moeoffload_emulation::streams_mutex());
  for (auto* s : moeoffload_emulation::live_streams()) s->drain();
  for (auto* s : moeoffload_emulation::retired_streams()) s->drain();
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t s) {
  if (moeoffload_emulation::fails("cudaMemcpyAsync", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  moeoffload_emulation::enqueue(s, [=] { std::memcpy(dst, src, bytes); });
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s) {
  if (moeoffload_emulation::fails("cudaMemsetAsync", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  moeoffload_emulation::enqueue(s, [=] { std::memset(dst, value, bytes); });
  return cudaSuccess;
}

inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  if (moeoffload_emulation::fails("cudaEventCreateWithFlags", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  *e = reinterpret_cast<cudaEvent_t>(new moeoffload_emulation::EventHandle);
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<moeoffload_emulation::EventHandle*>(e);
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (moeoffload_emulation::fails("cudaEventRecord", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  auto ev = moeoffload_emulation::event_of(e);
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(ev->mu);
    n = ++ev->recorded;
  }
  moeoffload_emulation::enqueue(s, [ev, n] {
    {
      std::lock_guard<std::mutex> lock(ev->mu);
      ev->reached = std::max(ev->reached, n);
    }
    ev->cv.notify_all();
  });
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (moeoffload_emulation::fails("cudaEventSynchronize", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  auto ev = moeoffload_emulation::event_of(e);
  {
    std::unique_lock<std::mutex> lock(ev->mu);
    const uint64_t n = ev->recorded;
    ev->cv.wait(lock, [&] { return ev->reached >= n; });
  }
  moeoffload_emulation::host_wakes_late();
  return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
  auto ev = moeoffload_emulation::event_of(e);
  std::lock_guard<std::mutex> lock(ev->mu);
  if (ev->reached >= ev->recorded) return cudaSuccess;
  moeoffload_emulation::last_error() = cudaErrorNotReady;  // as CUDA does: the caller must clear it
  return cudaErrorNotReady;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
  if (moeoffload_emulation::fails("cudaStreamWaitEvent", cudaErrorLaunchFailure)) return cudaErrorLaunchFailure;
  auto ev = moeoffload_emulation::event_of(e);
  uint64_t n;
  {
    std::lock_guard<std::mutex> lock(ev->mu);
    n = ev->recorded;
  }
  moeoffload_emulation::enqueue(s, [ev, n] {
    std::unique_lock<std::mutex> lock(ev->mu);
    ev->cv.wait(lock, [&] { return ev->reached >= n; });
  });
  return cudaSuccess;
}
