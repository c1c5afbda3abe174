#include "moeoffload/transfer_engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "moeoffload/errors.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moeoffload {

namespace {
std::string forked_message(const char* what) {
  return std::string(what) + " was created before fork(): its copy threads do not exist in this child process. "
                             "Build a new runtime (ExpertCache) in the child";
}
}  // namespace

// ---- Transfer ---------------------------------------------------------------

Transfer::~Transfer() {
#if MOEOFFLOAD_WITH_CUDA
  if (event_ && !waiting_.forked()) cudaEventDestroy(static_cast<cudaEvent_t>(event_));  // no CUDA in a child
#endif
}

bool Transfer::done() const { return done_.load(std::memory_order_acquire); }

bool Transfer::failed() const { return done() && !error_.empty(); }

std::string Transfer::error() const { return done() ? error_ : std::string(); }

ErrorKind Transfer::error_kind() const { return done() ? error_kind_ : ErrorKind::Cuda; }

void Transfer::check_not_orphaned() const {
  if (!done() && generation_ != fork_generation()) throw Error(ErrorKind::Forked, forked_message("this transfer"));
}

void Transfer::wait(double timeout_s) const {
  if (!done()) {
    check_not_orphaned();
    std::unique_lock<std::mutex> lock(waiting_->mu);
    auto is_done = [&] { return done(); };
    if (timeout_s < 0) {
      waiting_->cv.wait(lock, is_done);
    } else if (!waiting_->cv.wait_for(lock, std::chrono::duration<double>(timeout_s), is_done)) {
      throw Error(ErrorKind::Timeout, "transfer of " + std::to_string(bytes_) + " bytes (tag " + std::to_string(tag_) +
                                          ") not done after " + fmt_number(timeout_s) + " s");
    }
  }
  if (!error_.empty()) throw Error(error_kind_, error_);
}

void Transfer::mark_recorded() {
  {
    std::lock_guard<std::mutex> lock(waiting_->mu);
    waiting_->recorded = true;
  }
  waiting_->cv.notify_all();
}

void Transfer::order(void* stream) const {
  if (backend_ == Backend::Cpu || expands_) return wait();
#if MOEOFFLOAD_WITH_CUDA
  if (!done()) {
    check_not_orphaned();
    std::unique_lock<std::mutex> lock(waiting_->mu);
    waiting_->cv.wait(lock, [&] { return waiting_->recorded || done(); });
  }
  if (done() && !error_.empty()) throw Error(error_kind_, error_);
  cuda_check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0),
             "cudaStreamWaitEvent");
#else
  (void)stream;
#endif
}

void Transfer::add_callback(Callback cb) {
  if (!done()) {
    check_not_orphaned();  // it would never run
    std::lock_guard<std::mutex> lock(waiting_->mu);
    if (!done()) {
      waiting_->callbacks.push_back(std::move(cb));
      return;
    }
  }
  cb(*this);
}

void Transfer::finish(const std::string& error, ErrorKind kind) {
  std::vector<Callback> cbs;
  {
    std::lock_guard<std::mutex> lock(waiting_->mu);
    error_ = error;
    error_kind_ = kind;
    done_ns_ = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
    done_.store(true, std::memory_order_release);
    cbs.swap(waiting_->callbacks);
  }
  waiting_->cv.notify_all();
  for (auto& cb : cbs) {
    try {
      cb(*this);
    } catch (...) {
      // A callback's failure is the callback's business; the copy itself landed.
    }
  }
}

// ---- TransferEngine ---------------------------------------------------------

TransferEngine::TransferEngine(Backend backend, int num_streams, int issue_ahead)
    : backend_(backend), issue_ahead_(issue_ahead), generation_(fork_generation()) {
  if (num_streams < 1 || num_streams > 16)
    throw Error(ErrorKind::InvalidArgument, "TransferEngine needs 1 to 16 streams, got " + std::to_string(num_streams));
  if (issue_ahead < 1 || issue_ahead > kMaxIssued)
    throw Error(ErrorKind::InvalidArgument, "TransferEngine's issue_ahead must be 1 to " + std::to_string(kMaxIssued) +
                                                ", got " + std::to_string(issue_ahead));
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
  for (int i = 0; i < num_streams; ++i) {
    workers_[i]->thread = std::thread([this, i] { run(i); });
    if (backend_ == Backend::Cuda) workers_[i]->completer = std::thread([this, i] { complete(i); });
  }
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
  if (cb) t->waiting_->callbacks.push_back(std::move(cb));
  t->expands_ = static_cast<bool>(expand);
  workers_[best]->queue.push_back(Job{src, dst, bytes, t, std::move(expand), std::move(after)});
  workers_[best]->queued_bytes += bytes;
  stats_.copies += 1;
  stats_.bytes += bytes;
  stats_.in_flight += 1;
  work_cv_->notify_all();
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
      work_cv_->wait(lock, [&] {
        return (stopping_ && w.queue.empty()) ||
               (!w.queue.empty() && (backend_ == Backend::Cpu || w.issued.size() < static_cast<size_t>(issue_ahead_)));
      });
      if (w.queue.empty()) {  // stopping, and nothing left to copy
        w.issuer_done = true;
        lock.unlock();
        work_cv_->notify_all();  // the completer ends once what was issued is done
        return;
      }
      job = std::move(w.queue.front());
      w.queue.pop_front();
    }
    if (backend_ == Backend::Cpu) {
      ErrorKind kind = ErrorKind::Cuda;
      const std::string error = run_on_cpu(job, kind);
      finish(w, job, error, kind);
      continue;
    }
    Issued issued = issue(w, std::move(job));
    {
      std::lock_guard<std::mutex> lock(mu_);
      w.issued.push_back(std::move(issued));
      w.issued_total += 1;
    }
    work_cv_->notify_all();
  }
}

void TransferEngine::complete(int index) {
  Worker& w = *workers_[index];
#if MOEOFFLOAD_WITH_CUDA
  cudaSetDevice(device_);
#endif
  for (;;) {
    Issued issued;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_->wait(lock, [&] { return !w.issued.empty() || w.issuer_done; });
      if (w.issued.empty()) return;  // the issuer has ended and everything it issued is done
      issued = std::move(w.issued.front());  // its place stays taken, for the issuer's limit, until finish()
    }
    const std::string error = await(w, issued);
    finish(w, issued.job, error, issued.kind);
  }
}

void TransferEngine::finish(Worker& w, Job& job, const std::string& error, ErrorKind kind) {
  job.transfer->finish(error, kind);  // callbacks run before synchronize() can return
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (backend_ == Backend::Cuda) w.issued.pop_front();  // the issuer may queue one more
    w.queued_bytes -= job.bytes;
    stats_.in_flight -= 1;
  }
  work_cv_->notify_all();
  idle_cv_->notify_all();
}

std::string TransferEngine::run_on_cpu(Job& job, ErrorKind& kind) {
  const auto* src = static_cast<const uint8_t*>(job.src);
  auto* dst = static_cast<uint8_t*>(job.dst);
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

TransferEngine::Issued TransferEngine::issue(Worker& w, Job job) {
  Issued out;
  out.job = std::move(job);
#if MOEOFFLOAD_WITH_CUDA
  Job& j = out.job;
  auto s = static_cast<cudaStream_t>(w.stream);
  auto ev = static_cast<cudaEvent_t>(j.transfer->event_);
  cudaError_t err = cudaSuccess;
  if (j.expand && w.staging_bytes < j.bytes) {  // the reserve, or grows to the largest payload, then stays
    const uint64_t bytes = std::max(j.bytes, staging_reserve_.load());
    err = cudaStreamSynchronize(s);  // the copies issued before still read the old buffer (not this one's fences)
    if (err == cudaSuccess && w.staging) cudaFree(w.staging);
    if (err == cudaSuccess) {
      w.staging = nullptr;
      w.staging_bytes = 0;
      err = cudaMalloc(reinterpret_cast<void**>(&w.staging), bytes);
    }
    if (err == cudaSuccess) w.staging_bytes = bytes;
  }
  // Kernels still reading dst's old bytes go first.
  for (const auto& fence : j.after) {
    if (err != cudaSuccess) break;
    try {
      fence->order(s);
    } catch (const Error& e) {
      out.kind = e.kind();
      out.error = e.what();
      return out;
    }
  }
  if (j.expand) {
    if (err == cudaSuccess && !w.device_failed) err = cudaMalloc(reinterpret_cast<void**>(&w.device_failed), sizeof(int));
    if (err == cudaSuccess && !w.host_failed)
      err = cudaMallocHost(reinterpret_cast<void**>(&w.host_failed), issue_ahead_ * sizeof(int));
    int* host_failed = w.host_failed ? w.host_failed + w.issued_total % issue_ahead_ : nullptr;
    if (err == cudaSuccess) err = cudaMemsetAsync(w.device_failed, 0, sizeof(int), s);
    if (err == cudaSuccess) err = cudaMemcpyAsync(w.staging, j.src, j.bytes, cudaMemcpyHostToDevice, s);
    if (err == cudaSuccess) {
      try {
        j.expand(w.staging, static_cast<uint8_t*>(j.dst), s, w.device_failed);
      } catch (const Error& e) {
        out.kind = e.kind();
        out.error = e.what();
      } catch (const std::exception& e) {  // (say, out of host memory): this copy fails, the thread goes on
        out.kind = ErrorKind::Codec;
        out.error = e.what();
      }
    }
    if (err == cudaSuccess) err = cudaMemcpyAsync(host_failed, w.device_failed, sizeof(int), cudaMemcpyDeviceToHost, s);
    if (err == cudaSuccess) out.host_failed = host_failed;
  } else if (err == cudaSuccess) {
    err = cudaMemcpyAsync(j.dst, j.src, j.bytes, cudaMemcpyHostToDevice, s);
  }
  if (err == cudaSuccess) err = cudaEventRecord(ev, s);
  if (err == cudaSuccess) {
    out.recorded = true;
    j.transfer->mark_recorded();  // a compute stream may now wait on it (order())
  } else {
    cudaGetLastError();
    out.kind = ErrorKind::Cuda;
    out.error = "copy of " + std::to_string(j.bytes) + " bytes failed: " + cudaGetErrorString(err);
    out.host_failed = nullptr;
  }
#else
  (void)w;
  out.error = "the cuda backend needs a build with CUDA";
#endif
  return out;
}

std::string TransferEngine::await(Worker& w, Issued& issued) {
#if MOEOFFLOAD_WITH_CUDA
  Job& j = issued.job;
  if (issued.recorded) {
    const cudaError_t err = cudaEventSynchronize(static_cast<cudaEvent_t>(j.transfer->event_));
    if (err != cudaSuccess) {
      cudaGetLastError();
      issued.kind = ErrorKind::Cuda;
      issued.error = "copy of " + std::to_string(j.bytes) + " bytes failed: " + cudaGetErrorString(err);
    }
  }
  if (!issued.error.empty()) {
    // A failed copy reports once nothing it queued can still write dst and the kernels its fences
    // guard are done (the cache drops a slot's fences once the copy is queued, and may hand the slot
    // to a copy on another stream as soon as this one reports).
    cudaStreamSynchronize(static_cast<cudaStream_t>(w.stream));
    for (const auto& fence : j.after) fence->wait();
    cudaGetLastError();
    return issued.error;
  }
  if (issued.host_failed && *issued.host_failed) {
    issued.kind = ErrorKind::CorruptData;
    return "szpe payload of expert " + std::to_string(j.transfer->tag()) +
           " did not decode on the device: a stream is corrupt. Rebuild the table from the original weights";
  }
  return "";
#else
  (void)w;
  return issued.error;
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
  idle_cv_->wait(lock, [&] { return stats_.in_flight == 0; });
}

void TransferEngine::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    if (generation_ != fork_generation()) {
      // A forked child has none of the copy threads (fork() held mu_, so what they left is whole).
      // Everything a worker owns is leaked, not destroyed: its threads cannot be joined, its copies'
      // fences and events would go through CUDA, and its copies' callbacks (Python ones included)
      // must not run for copies that never happen. Those transfers stay not done: they raise Forked.
      for (auto& w : workers_) (void)w.release();
      workers_.clear();
      stats_.in_flight = 0;
      return;
    }
  }
  work_cv_->notify_all();
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();  // then the completer ends once the last copy is done
    if (w->completer.joinable()) w->completer.join();
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
