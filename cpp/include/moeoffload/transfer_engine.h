// Asynchronous host-to-device copies of compressed payloads on dedicated copy
// streams, each optionally expanded on arrival (an entropy-coded payload is
// transcoded into what the device cache holds: Expand). On cuda each copy stream
// has two threads: one issues each copy (cudaMemcpyAsync, the expansion's
// kernels, an event) on its own non-blocking stream as soon as it is queued, up
// to issue_ahead (8) ahead, and one waits for those events in order and completes
// the transfers; so the stream always has its next copy queued and the bus
// does not idle while a host thread wakes up. On cpu one thread a stream runs
// the memcpy itself. Either way copy() returns at once with a Transfer to poll
// or wait on, and callbacks run on a worker thread after the bytes have
// landed. A compute stream that reads the destination orders itself after the
// copy with Transfer::order (cudaStreamWaitEvent), no host wait.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moeoffload/errors.h"
#include "moeoffload/fence.h"
#include "moeoffload/fork.h"
#include "moeoffload/memory.h"

namespace moeoffload {

class Transfer {
 public:
  using Callback = std::function<void(const Transfer&)>;
  ~Transfer();
  bool done() const;
  // Blocks until the copy lands; timeout_s < 0 waits forever. Rethrows a copy
  // error; raises Timeout past the limit.
  void wait(double timeout_s = -1.0) const;
  bool failed() const;
  std::string error() const;
  // Runs cb at once when the copy has landed, else on the worker after it.
  void add_callback(Callback cb);
  uint64_t bytes() const { return bytes_; }
  uint64_t tag() const { return tag_; }
  int stream_index() const { return stream_; }
  uintptr_t cuda_event() const { return reinterpret_cast<uintptr_t>(event_); }
  // When the copy was seen to land, in ns of std::chrono::steady_clock (CLOCK_MONOTONIC on Linux, as
  // Python's time.monotonic_ns()); 0 until it is done. On cuda its completer thread sees it (it spins
  // on the copy's event), so this is within microseconds of the copy's end.
  uint64_t done_ns() const { return done() ? done_ns_ : 0; }
  ErrorKind error_kind() const;
  // Makes work on `stream` (a cudaStream_t on cuda) see what this copy brings: on cpu it waits for
  // the copy; on cuda it orders the stream after the copy's event without a host wait, once the copy
  // worker has recorded it (an event not yet recorded orders nothing). An expanded copy (szpe) is
  // waited for on the host instead, since whether it decoded is known only there: a kernel must not
  // read the szp offsets of a stream that did not. Rethrows the copy's error.
  void order(void* stream) const;

 private:
  friend class TransferEngine;
  Transfer(uint64_t bytes, uint64_t tag, int stream)
      : bytes_(bytes), tag_(tag), stream_(stream), generation_(fork_generation()) {}
  void finish(const std::string& error, ErrorKind kind = ErrorKind::Cuda);
  void mark_recorded();  // the worker recorded event_ on its stream
  // Not done and made before a fork this process descends from: it never will be (raises Forked).
  void check_not_orphaned() const;
  const uint64_t bytes_, tag_;
  const int stream_;
  const uint64_t generation_;
  void* event_ = nullptr;  // cudaEvent_t on cuda
  Backend backend_ = Backend::Cpu;
  bool expands_ = false;  // lands through an Expand
  // Set once, with error_ and error_kind_ written before it and never after: a done transfer is read
  // without its lock, which a forked child must not take (a copy thread may have held it).
  std::atomic<bool> done_{false};
  uint64_t done_ns_ = 0;
  std::string error_;
  ErrorKind error_kind_ = ErrorKind::Cuda;
  struct Waiting {
    std::mutex mu;
    std::condition_variable cv;
    bool recorded = false;  // event_ is recorded (cuda): a stream can wait on it
    std::vector<Callback> callbacks;
  };
  ParentOnly<Waiting> waiting_;
};

struct TransferStats {
  uint64_t copies = 0;
  uint64_t bytes = 0;
  uint64_t in_flight = 0;
};

// Turns the `bytes` copied from the host into what lands at dst, on the copy
// worker. On cpu, src is the host payload itself (nothing is staged: the
// expansion reads it directly); on cuda, src is a device staging copy, stream
// the worker's copy stream (cudaStream_t) on which it enqueues its kernels, and
// device_failed an int it sets to nonzero when the data do not decode (the
// engine zeroes it before and reads it back after). Throws Error to fail the
// transfer.
using Expand = std::function<void(const uint8_t* src, uint8_t* dst, void* stream, int* device_failed)>;

class TransferEngine {
 public:
  // The most copies a stream issues ahead of the one it completes (cuda).
  static constexpr int kMaxIssued = 8;
  // issue_ahead (1 to kMaxIssued): how many a stream issues ahead; 1 issues each copy only once the one
  // before it has landed and its thread has woken up (the baseline bench/transfer_overlap.py measures).
  TransferEngine(Backend backend, int num_streams = 2, int issue_ahead = kMaxIssued);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Copies `bytes` from host `src` (pinned on cuda) to device `dst`. `tag` is
  // the caller's label (an expert id); `cb` runs after the copy lands.
  // With `expand`, what lands at dst is expand's output, not the bytes.
  // `after` (cuda): fences the copy stream waits for before it writes anything (fence.h).
  std::shared_ptr<Transfer> copy(const void* src, void* dst, uint64_t bytes, uint64_t tag = 0,
                                 Transfer::Callback cb = {}, Expand expand = {},
                                 std::vector<std::shared_ptr<const Fence>> after = {});
  // cuda: each stream's staging buffer for expanded copies, made at its first one, takes at least
  // the largest `bytes` asked (a device cache passes its store's largest payload). Without it the
  // buffer grows to each larger payload as it comes, and growing frees the old one: cudaFree waits
  // for the whole device.
  void reserve_staging(uint64_t bytes) {
    uint64_t now = staging_reserve_.load();
    while (now < bytes && !staging_reserve_.compare_exchange_weak(now, bytes)) {
    }
  }
  void synchronize();  // waits for every copy issued so far
  bool closed() const;
  void close();        // finishes queued copies, stops the workers
  int num_streams() const { return static_cast<int>(workers_.size()); }
  int issue_ahead() const { return issue_ahead_; }
  uintptr_t cuda_stream(int i) const;
  Backend backend() const { return backend_; }
  TransferStats stats() const;

 private:
  struct Job {
    const void* src;
    void* dst;
    uint64_t bytes;
    std::shared_ptr<Transfer> transfer;
    Expand expand;
    std::vector<std::shared_ptr<const Fence>> after;
  };
  // cuda: a job whose work is queued on its copy stream (or that failed to queue)
  struct Issued {
    Job job;
    bool recorded = false;  // its event is recorded after its work: the completer waits for it
    std::string error;      // the issue failed, or the expansion threw: reported once the stream is past it
    ErrorKind kind = ErrorKind::Cuda;
    const int* host_failed = nullptr;  // an expanded copy's failure flag, read back
  };
  struct Worker {
    std::deque<Job> queue;
    std::deque<Issued> issued;  // cuda: in the order issued, at most issue_ahead_
    uint64_t issued_total = 0;
    bool issuer_done = false;
    uint64_t queued_bytes = 0;
    void* stream = nullptr;  // cudaStream_t on cuda
    // cuda, for expanded copies: the staged bytes, the device's failure flag, and issue_ahead_ pinned
    // host flags, one for each copy in flight (a job's is issued_total % issue_ahead_ when issued). The
    // stream's order keeps one staging buffer and one device flag safe for every job on it.
    uint8_t* staging = nullptr;
    uint64_t staging_bytes = 0;
    int* device_failed = nullptr;
    int* host_failed = nullptr;
    std::thread thread;     // cpu: runs each job; cuda: issues each job
    std::thread completer;  // cuda: completes each issued job
  };
  void run(int index);
  void complete(int index);  // cuda
  // cpu: runs one job; returns the error ("" when it landed) and its kind.
  std::string run_on_cpu(Job& job, ErrorKind& kind);
  Issued issue(Worker& w, Job job);              // cuda
  std::string await(Worker& w, Issued& issued);  // cuda: "" when it landed, else the error (kind in issued)
  // A job is done: finishes its transfer, then frees its place (stats, the issuer's limit, synchronize).
  void finish(Worker& w, Job& job, const std::string& error, ErrorKind kind);
  void free_worker(Worker& w);
  void check_usable_locked() const;  // Closed after close(), Forked in a child
  Backend backend_;
  int issue_ahead_;
  std::atomic<uint64_t> staging_reserve_{0};
  uint64_t generation_;
  int device_ = 0;
  mutable std::mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, 3};
  ParentOnly<std::condition_variable> work_cv_, idle_cv_;
  std::vector<std::unique_ptr<Worker>> workers_;
  bool stopping_ = false;
  int next_stream_ = 0;
  TransferStats stats_;
};

}  // namespace moeoffload
