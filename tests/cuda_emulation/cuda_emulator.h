// A CPU emulator of warp-synchronous CUDA device code, for kernels no GPU has run yet: every thread
// of a block is a std::thread, blocks run one after another. Warp collectives (ballots, shuffles,
// reductions, __syncwarp) meet at a barrier of the warp's 32 threads and each lane reads every lane's
// value; __syncthreads is a barrier of the block; __shared__ variables are function statics (one
// block at a time). Only full-warp masks are supported, and a collective after some lanes of a warp
// have returned aborts: both are bugs on a GPU too.
//
// What it checks is the algorithm: which lane reads which word, ballot and prefix orders, reductions,
// shared-memory staging, bounds. It does not model the memory system, timing or the device's float
// intrinsics beyond round-to-nearest (build with -ffp-contract=off, as the CPU kernels are).
//
// Include it before the .cuh of the kernels; launch with moeoffload_emulation::launch(grid, block,
// kernel, args...).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace moeoffload_emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// A barrier whose party shrinks as threads leave (drop).
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t phase = phase_;
    if (++arrived_ == expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void drop() {
    std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_, arrived_ = 0;
  uint64_t phase_ = 0;
};

struct Warp {
  explicit Warp(int n) : barrier(n), lanes(n) {}
  Barrier barrier;
  int lanes, returned = 0;
  uint64_t slot[32] = {};
};

inline thread_local Warp* this_warp = nullptr;
inline thread_local unsigned this_lane = 0;
inline thread_local Barrier* this_block = nullptr;

// Every lane's value of v (as 64 bits), after all lanes of the warp gave theirs.
template <typename T>
void exchange(unsigned mask, T v, T (&all)[32]) {
  static_assert(sizeof(T) <= 8, "a lane's value is at most 64 bits");
  Warp& w = *this_warp;
  if (mask != 0xFFFFFFFFu) fail("only full-warp masks are emulated");
  if (w.lanes != 32) fail("a warp collective in a partial warp");
  if (__atomic_load_n(&w.returned, __ATOMIC_SEQ_CST)) fail("a warp collective after some lanes of the warp returned");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[this_lane] = bits;
  w.barrier.arrive_and_wait();
  for (int i = 0; i < 32; ++i) std::memcpy(&all[i], &w.slot[i], sizeof(T));
  w.barrier.arrive_and_wait();  // slots free for the next collective
}

// The threads of a block, kept across blocks and launches (starting threads is most of the cost of
// an emulated launch, under a sanitizer especially): run(n, job) calls job(t) on threads t = 0..n-1 and
// returns when all have returned.
class ThreadPool {
 public:
  void run(int n, const std::function<void(int)>& job) {
    while (static_cast<int>(threads_.size()) < n) {
      const int t = static_cast<int>(threads_.size());
      threads_.emplace_back([this, t] { loop(t); });
    }
    std::unique_lock<std::mutex> lock(m_);
    job_ = &job;
    active_ = n;
    pending_ = n;
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return pending_ == 0; });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      cv_.notify_all();
    }
    for (std::thread& th : threads_) th.join();
  }

 private:
  void loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return stop_ || (generation_ != seen && t < active_); });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      (*job)(t);
      std::lock_guard<std::mutex> lock(m_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
  bool stop_ = false;
};

// Runs kernel(args...) over the grid, a thread a CUDA thread, one block at a time.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  static ThreadPool pool;
  gridDim = grid;
  blockDim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Barrier block_barrier(n);
        std::vector<std::unique_ptr<Warp>> warps;
        for (int t = 0; t < n; t += 32) warps.push_back(std::make_unique<Warp>(n - t < 32 ? n - t : 32));
        pool.run(n, [&](int t) {
          threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          blockIdx = dim3(bx, by, bz);
          this_warp = warps[t / 32].get();
          this_lane = t % 32;
          this_block = &block_barrier;
          kernel(args...);
          __atomic_add_fetch(&this_warp->returned, 1, __ATOMIC_SEQ_CST);
          this_warp->barrier.drop();
          block_barrier.drop();
        });
      }
}

}  // namespace moeoffload_emulation

inline void __syncthreads() { moeoffload_emulation::this_block->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  int all[32];
  moeoffload_emulation::exchange(mask, 0, all);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  int all[32];
  moeoffload_emulation::exchange(mask, pred ? 1 : 0, all);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<unsigned>(all[i] != 0) << i;
  return bits;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xFFFFFFFFu; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) moeoffload_emulation::fail("only full-width shuffles are emulated");
  T all[32];
  moeoffload_emulation::exchange(mask, v, all);
  return all[src & 31];
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) moeoffload_emulation::fail("only full-width shuffles are emulated");
  T all[32];
  moeoffload_emulation::exchange(mask, v, all);
  const unsigned lane = moeoffload_emulation::this_lane;
  return lane >= delta ? all[lane - delta] : v;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) moeoffload_emulation::fail("only full-width shuffles are emulated");
  T all[32];
  moeoffload_emulation::exchange(mask, v, all);
  const unsigned lane = moeoffload_emulation::this_lane;
  return lane + delta < 32 ? all[lane + delta] : v;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) moeoffload_emulation::fail("only full-width shuffles are emulated");
  T all[32];
  moeoffload_emulation::exchange(mask, v, all);
  return all[(moeoffload_emulation::this_lane ^ lane_mask) & 31];
}

template <typename T, typename F>
T emulated_reduce(unsigned mask, T v, F op) {
  T all[32];
  moeoffload_emulation::exchange(mask, v, all);
  T r = all[0];
  for (int i = 1; i < 32; ++i) r = op(r, all[i]);
  return r;
}
inline int __reduce_min_sync(unsigned mask, int v) { return emulated_reduce(mask, v, [](int a, int b) { return a < b ? a : b; }); }
inline int __reduce_max_sync(unsigned mask, int v) { return emulated_reduce(mask, v, [](int a, int b) { return a > b ? a : b; }); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return emulated_reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return emulated_reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; });
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) { return emulated_reduce(mask, v, [](unsigned a, unsigned b) { return a | b; }); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) { return emulated_reduce(mask, v, [](unsigned a, unsigned b) { return a & b; }); }
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) { return emulated_reduce(mask, v, [](unsigned a, unsigned b) { return a + b; }); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz(static_cast<unsigned>(v)) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }

inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int2float_rn(int v) { return static_cast<float>(v); }

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
