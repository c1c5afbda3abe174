#include "moeoffload/transfer_engine.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstring>

#include "moeoffload/errors.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moeoffload {

namespace {
std::atomic<uint64_t> g_fork_generation{0};
const bool g_fork_hook = [] {
  pthread_atfork(nullptr, nullptr, [] { g_fork_generation.fetch_add(1); });
  return true;
}();

std::string forked_message(const char* what) {
  return std::string(what) + " was created before fork(): its copy threads do not exist in this child process. "
                             "Build a new runtime (ExpertCache) in the child";
}
}  // namespace

uint64_t fork_generation() { return g_fork_generation.load(); }

// ---- Transfer ---------------------------------------------------------------

Transfer::~Transfer() {
#if MOEOFFLOAD_WITH_CUDA
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
#endif
}

bool Transfer::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

bool Transfer::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_ && !error_.empty();
}

std::string Transfer::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Transfer::wait(double timeout_s) const {
  std::unique_lock<std::mutex> lock(mu_);
  if (!done_ && generation_ != fork_generation()) throw Error(ErrorKind::Forked, forked_message("this transfer"));
  if (timeout_s < 0) {
    cv_.wait(lock, [&] { return done_; });
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return done_; })) {
    throw Error(ErrorKind::Timeout, "transfer of " + std::to_string(bytes_) + " bytes (tag " + std::to_string(tag_) +
                                        ") not done after " + fmt_number(timeout_s) + " s");
  }
  if (!error_.empty()) throw Error(error_kind_, error_);
}

ErrorKind Transfer::error_kind() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_kind_;
}

void Transfer::mark_recorded() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    recorded_ = true;
  }
  cv_.notify_all();
}

void Transfer::order(void* stream) const {
  if (backend_ == Backend::Cpu || expands_) return wait();
#if MOEOFFLOAD_WITH_CUDA
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!done_ && !recorded_ && generation_ != fork_generation())
      throw Error(ErrorKind::Forked, forked_message("this transfer"));
    cv_.wait(lock, [&] { return recorded_ || done_; });
    if (!error_.empty()) throw Error(error_kind_, error_);
  }
  cuda_check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0),
             "cudaStreamWaitEvent");
#else
  (void)stream;
#endif
}

void Transfer::add_callback(Callback cb) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done_) {
      callbacks_.push_back(std::move(cb));
      return;
    }
  }
  cb(*this);
}

void Transfer::finish(const std::string& error, ErrorKind kind) {
  std::vector<Callback> cbs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = error;
    error_kind_ = kind;
    done_ = true;
    cbs.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : cbs) {
    try {
      cb(*this);
    } catch (...) {
      // A callback's failure is the callback's business; the copy itself landed.
    }
  }
}

// ---- TransferEngine ---------------------------------------------------------

TransferEngine::TransferEngine(Backend backend, int num_streams)
    : backend_(backend), generation_(fork_generation()) {
  (void)g_fork_hook;
  if (num_streams < 1 || num_streams > 16)
    throw Error(ErrorKind::InvalidArgument, "TransferEngine needs 1 to 16 streams, got " + std::to_string(num_streams));
#if MOEOFFLOAD_WITH_CUDA
  if (backend_ == Backend::Cuda) cuda_check(cudaGetDevice(&device_), "cudaGetDevice");
#else
  if (backend_ == Backend::Cuda) throw Error(ErrorKind::Cuda, "the cuda backend needs a build with CUDA");
#endif
  for (int i = 0; i < num_streams; ++i) {
    auto w = std::make_unique<Worker>();
#if MOEOFFLOAD_WITH_CUDA
    if (backend_ == Backend::Cuda) {
      cudaStream_t s = nullptr;
      cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      w->stream = s;
    }
#endif
    workers_.push_back(std::move(w));
  }
  for (int i = 0; i < num_streams; ++i) workers_[i]->thread = std::thread([this, i] { run(i); });
}

TransferEngine::~TransferEngine() { close(); }

uintptr_t TransferEngine::cuda_stream(int i) const {
  if (i < 0 || i >= num_streams()) throw Error(ErrorKind::InvalidArgument, "no copy stream " + std::to_string(i));
  return reinterpret_cast<uintptr_t>(workers_[i]->stream);
}

std::shared_ptr<Transfer> TransferEngine::copy(const void* src, void* dst, uint64_t bytes, uint64_t tag,
                                               Transfer::Callback cb, Expand expand,
                                               std::vector<std::shared_ptr<const Fence>> after) {
  std::lock_guard<std::mutex> lock(mu_);
  check_usable_locked();
  // The stream with the fewest queued bytes takes the copy; ties go round-robin.
  const int n = num_streams();
  int best = next_stream_ % n;
  for (int k = 1; k < n; ++k) {
    const int i = (next_stream_ + k) % n;
    if (workers_[i]->queued_bytes < workers_[best]->queued_bytes) best = i;
  }
  next_stream_ = (best + 1) % n;
  auto t = std::shared_ptr<Transfer>(new Transfer(bytes, tag, best));
  t->backend_ = backend_;
#if MOEOFFLOAD_WITH_CUDA
  if (backend_ == Backend::Cuda) {
    cudaEvent_t ev = nullptr;
    cuda_check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    t->event_ = ev;
  }
#endif
  if (cb) t->callbacks_.push_back(std::move(cb));
  t->expands_ = static_cast<bool>(expand);
  workers_[best]->queue.push_back(Job{src, dst, bytes, t, std::move(expand), std::move(after)});
  workers_[best]->queued_bytes += bytes;
  stats_.copies += 1;
  stats_.bytes += bytes;
  stats_.in_flight += 1;
  work_cv_.notify_all();
  return t;
}

void TransferEngine::run(int index) {
  Worker& w = *workers_[index];
#if MOEOFFLOAD_WITH_CUDA
  if (backend_ == Backend::Cuda) cudaSetDevice(device_);
#endif
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stopping_ || !w.queue.empty(); });
      if (w.queue.empty()) return;  // stopping, and nothing left to copy
      job = std::move(w.queue.front());
      w.queue.pop_front();
    }
    ErrorKind kind = ErrorKind::Cuda;
    const std::string error = run_job(w, job, kind);
    job.transfer->finish(error, kind);  // callbacks run before synchronize() can return
    {
      std::lock_guard<std::mutex> lock(mu_);
      w.queued_bytes -= job.bytes;
      stats_.in_flight -= 1;
    }
    idle_cv_.notify_all();
  }
}

std::string TransferEngine::run_job(Worker& w, Job& job, ErrorKind& kind) {
  const auto* src = static_cast<const uint8_t*>(job.src);
  auto* dst = static_cast<uint8_t*>(job.dst);
  if (backend_ == Backend::Cpu) {
    try {
      if (job.expand)
        job.expand(src, dst, nullptr, nullptr);
      else
        std::memcpy(dst, src, job.bytes);
    } catch (const Error& e) {
      kind = e.kind();
      return e.what();
    } catch (const std::exception& e) {
      kind = ErrorKind::Codec;  // the expansion failed (say, out of memory)
      return e.what();
    }
    return "";
  }
#if MOEOFFLOAD_WITH_CUDA
  auto s = static_cast<cudaStream_t>(w.stream);
  auto ev = static_cast<cudaEvent_t>(job.transfer->event_);
  cudaError_t err = cudaSuccess;
  std::string expand_error;
  // Kernels still reading dst's old bytes go first. A copy that fails after this still waits for them
  // before it reports (the cache drops the fences of its slot once the copy is queued).
  auto fail = [&](ErrorKind k, std::string what) {
    if (!job.after.empty()) cudaStreamSynchronize(s);
    kind = k;
    return what;
  };
  for (const auto& fence : job.after) {
    try {
      fence->order(s);
    } catch (const Error& e) {
      return fail(e.kind(), e.what());
    }
  }
  if (job.expand) {
    if (w.staging_bytes < job.bytes) {  // grows to the largest payload, then stays
      if (w.staging) cudaFree(w.staging);
      w.staging = nullptr;
      w.staging_bytes = 0;
      err = cudaMalloc(reinterpret_cast<void**>(&w.staging), job.bytes);
      if (err == cudaSuccess) w.staging_bytes = job.bytes;
    }
    if (err == cudaSuccess && !w.device_failed) err = cudaMalloc(reinterpret_cast<void**>(&w.device_failed), sizeof(int));
    if (err == cudaSuccess && !w.host_failed) err = cudaMallocHost(reinterpret_cast<void**>(&w.host_failed), sizeof(int));
    if (err == cudaSuccess) err = cudaMemsetAsync(w.device_failed, 0, sizeof(int), s);
    if (err == cudaSuccess) err = cudaMemcpyAsync(w.staging, src, job.bytes, cudaMemcpyHostToDevice, s);
    if (err == cudaSuccess) {
      try {
        job.expand(w.staging, dst, s, w.device_failed);
      } catch (const Error& e) {
        kind = e.kind();
        expand_error = e.what();
      }
    }
    if (err == cudaSuccess) err = cudaMemcpyAsync(w.host_failed, w.device_failed, sizeof(int), cudaMemcpyDeviceToHost, s);
  } else {
    err = cudaMemcpyAsync(dst, src, job.bytes, cudaMemcpyHostToDevice, s);
  }
  if (err == cudaSuccess) err = cudaEventRecord(ev, s);
  if (err == cudaSuccess) job.transfer->mark_recorded();  // a compute stream may now wait on it (order())
  if (err == cudaSuccess) err = cudaEventSynchronize(ev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return fail(ErrorKind::Cuda,
                std::string("copy of ") + std::to_string(job.bytes) + " bytes failed: " + cudaGetErrorString(err));
  }
  if (!expand_error.empty()) return fail(kind, expand_error);
  if (job.expand && *w.host_failed) {
    kind = ErrorKind::CorruptData;
    return "szpe payload of expert " + std::to_string(job.transfer->tag()) +
           " did not decode on the device: a stream is corrupt. Rebuild the table from the original weights";
  }
  return "";
#else
  (void)w;
  kind = ErrorKind::Cuda;
  return "the cuda backend needs a build with CUDA";
#endif
}

void TransferEngine::free_worker(Worker& w) {
#if MOEOFFLOAD_WITH_CUDA
  if (w.stream) cudaStreamDestroy(static_cast<cudaStream_t>(w.stream));
  if (w.staging) cudaFree(w.staging);
  if (w.device_failed) cudaFree(w.device_failed);
  if (w.host_failed) cudaFreeHost(w.host_failed);
#endif
  w.stream = nullptr;
  w.staging = nullptr;
  w.device_failed = w.host_failed = nullptr;
}

void TransferEngine::check_usable_locked() const {
  if (generation_ != fork_generation()) throw Error(ErrorKind::Forked, forked_message("this TransferEngine"));
  if (stopping_) throw Error(ErrorKind::Closed, "TransferEngine is closed");
}

bool TransferEngine::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stopping_;
}

void TransferEngine::synchronize() {
  std::unique_lock<std::mutex> lock(mu_);
  if (generation_ != fork_generation()) throw Error(ErrorKind::Forked, forked_message("this TransferEngine"));
  idle_cv_.wait(lock, [&] { return stats_.in_flight == 0; });
}

void TransferEngine::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    if (generation_ != fork_generation()) {
      // In a forked child the threads do not exist: forget them (joining would
      // fail) and let the queued transfers fail.
      for (auto& w : workers_) {
        (void)new std::thread(std::move(w->thread));  // never joined nor destroyed: leaked on purpose
        for (auto& job : w->queue) job.transfer->finish("the copy thread did not survive fork()");
        w->queue.clear();
      }
      workers_.clear();
      stats_.in_flight = 0;
      return;
    }
  }
  work_cv_.notify_all();
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
    free_worker(*w);
  }
  std::lock_guard<std::mutex> lock(mu_);
  workers_.clear();
}

TransferStats TransferEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace moeoffload
