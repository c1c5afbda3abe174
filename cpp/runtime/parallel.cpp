// parallel_for on a persistent pool: starting threads per call cost more than
// decoding a whole expert matrix (measured: 2 threads started per call ran a
// 2.4 MB decode at half the speed of 1 thread). Workers sleep on a condition
// variable between jobs; the caller works too. One job runs at a time (calls
// from several threads queue on a mutex); a parallel_for from inside a job runs
// inline, so nesting cannot deadlock.
#include "moeoffload/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace moeoffload {

namespace {

std::atomic<int> g_threads{0};
thread_local bool t_inside_job = false;

// Read once: hardware_concurrency() opens and reads /sys/devices/system/cpu/online, and a decode
// step asks at every matrix (measured: 7 µs a call on this VM, most of a tiny layer's moe_experts).
int default_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("MOEOFFLOAD_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) return v;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
  }();
  return n;
}

class Pool {
 public:
  void run(uint64_t n, uint64_t per, uint64_t workers, const std::function<void(uint64_t, uint64_t)>& fn) {
    std::lock_guard<std::mutex> one_job(job_mutex_);
    grow(workers - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_ = n;
      per_ = per;
      next_ = 0;
      error_ = nullptr;
      wanted_ = workers - 1;
      joined_ = 0;
      ++generation_;
    }
    cv_work_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(m_);
    wanted_ = joined_;  // close the job: a worker waking late must not join it
    cv_done_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // Joins the workers (between jobs); the next job starts them again.
  void stop() {
    std::lock_guard<std::mutex> one_job(job_mutex_);
    {
      std::lock_guard<std::mutex> lk(m_);
      stopping_ = true;
    }
    cv_work_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    std::lock_guard<std::mutex> lk(m_);
    stopping_ = false;
  }

 private:
  void grow(uint64_t count) {
    while (threads_.size() < count) threads_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_work_.wait(lk, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      if (joined_ >= wanted_) continue;
      ++joined_;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) cv_done_.notify_all();
    }
  }

  void work() {
    t_inside_job = true;
    for (;;) {
      uint64_t begin = next_.fetch_add(per_);
      if (begin >= n_) break;
      try {
        (*fn_)(begin, std::min(n_, begin + per_));
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);
        break;
      }
    }
    t_inside_job = false;
  }

  std::mutex job_mutex_;
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> threads_;
  const std::function<void(uint64_t, uint64_t)>* fn_ = nullptr;
  uint64_t n_ = 0, per_ = 1, wanted_ = 0, joined_ = 0, generation_ = 0;
  std::atomic<uint64_t> next_{0};
  int active_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// Never destroyed: workers blocked on the condition variable at exit are fine,
// joining them from a static destructor is not. A forked child has none of the
// parent's threads (and maybe a mutex the parent held mid-job), so it starts
// from a fresh pool; the old one is abandoned.
Pool* g_pool = nullptr;

Pool& pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
  });
  return *g_pool;
}

}  // namespace

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

void stop_threads() { pool().stop(); }

void parallel_for(uint64_t n, uint64_t grain, const std::function<void(uint64_t, uint64_t)>& fn) {
  if (n == 0) return;
  grain = std::max<uint64_t>(grain, 1);
  const uint64_t max_chunks = (n + grain - 1) / grain;
  const uint64_t workers = std::min<uint64_t>(static_cast<uint64_t>(num_threads()), max_chunks);
  if (workers <= 1 || t_inside_job) {
    fn(0, n);
    return;
  }
  // Several chunks per worker, handed out dynamically, so uneven rows balance.
  const uint64_t chunks = std::min<uint64_t>(max_chunks, workers * 4);
  pool().run(n, (n + chunks - 1) / chunks, workers, fn);
}

}  // namespace moeoffload
