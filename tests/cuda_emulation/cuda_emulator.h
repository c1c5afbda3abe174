// A CPU emulator of warp-synchronous CUDA device code, for kernels no GPU has run yet. Every thread of
// a block is a fiber (ucontext) on the calling thread; each round the scheduler resumes the lanes of a
// random half of the warps in a shuffled order (so warps drift apart between barriers); blocks run one
// after another.
// A warp collective (ballot, shuffle, reduction, __syncwarp) stores the lane's value and yields until
// every lane of the warp has stored its own, then reads them all; __syncthreads yields until every
// thread of the block has arrived (or returned); __shared__ variables are function statics (one block
// at a time) and dynamic shared memory one buffer a launch, poisoned before each block. Only
// full-warp masks are supported, and a collective after some lanes of a warp returned aborts: both
// are bugs on a GPU too.
//
// What it checks is the algorithm: which lane reads which word, ballot and prefix orders, reductions,
// shared-memory staging, bounds (with AddressSanitizer). It does not model the memory system, timing
// or the device's float intrinsics beyond round-to-nearest (build with -ffp-contract=off, as the CPU
// kernels are). A race (shared memory read by one warp before another wrote it, with no barrier
// between) shows where the shuffled schedule changes the result.
//
// The kernels' .cu files compile unchanged as C++ against it: tests/cuda_emulation/cuda_runtime.h
// stands in for CUDA's header, and cuda/launch.cuh launches through moeoffload_emulation::launch.
#pragma once
#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)  // tell AddressSanitizer which stack each switch goes to
#include <sanitizer/common_interface_defs.h>
#define MOEOFFLOAD_EMULATION_ASAN 1
#else
#define MOEOFFLOAD_EMULATION_ASAN 0
#endif

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

// The running fiber's (set by the scheduler before it resumes one).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace moeoffload_emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

struct Warp {
  int lanes = 32, returned = 0;
  uint64_t entered[32] = {};  // collectives each lane has entered
  uint64_t slot[2][32] = {};  // by the parity of the collective: a lane may enter the next before all read this one
};

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  size_t stack_size = 0;
  bool done = false;
  uint64_t barriers = 0;  // __syncthreads each thread has entered
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  int current = 0;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber switches
  size_t scheduler_stack_size = 0;
  void* dynamic_shared = nullptr;
  const std::function<void()>* kernel = nullptr;
};

inline Block* this_block = nullptr;

inline Warp& this_warp() { return this_block->warps[this_block->current / 32]; }
inline unsigned this_lane() { return static_cast<unsigned>(this_block->current % 32); }
inline void* dynamic_shared() { return this_block->dynamic_shared; }

// From the running fiber to the scheduler, and back when it is resumed.
inline void yield() {
  Block& b = *this_block;
#if MOEOFFLOAD_EMULATION_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, b.scheduler_stack, b.scheduler_stack_size);
#endif
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
#if MOEOFFLOAD_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
}

// From the scheduler to fiber t, and back when it yields or returns.
inline void resume(Block& b, int t) {
  b.current = t;
#if MOEOFFLOAD_EMULATION_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, b.fibers[t].stack, b.fibers[t].stack_size);
#endif
  swapcontext(&b.scheduler, &b.fibers[t].context);
#if MOEOFFLOAD_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Every lane's value of v, after all lanes of the warp gave theirs.
template <typename T>
void exchange(unsigned mask, T v, T (&all)[32]) {
  static_assert(sizeof(T) <= 8, "a lane's value is at most 64 bits");
  Warp& w = this_warp();
  const unsigned lane = this_lane();
  if (mask != 0xFFFFFFFFu) fail("only full-warp masks are emulated");
  if (w.lanes != 32) fail("a warp collective in a partial warp");
  const uint64_t n = w.entered[lane]++;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[n & 1][lane] = bits;
  for (;;) {
    bool all = true;
    for (int i = 0; i < 32; ++i) all &= w.entered[i] > n;
    if (all) break;
    if (w.returned) fail("a warp collective after some lanes of the warp returned");
    yield();
  }
  for (int i = 0; i < 32; ++i) std::memcpy(&all[i], &w.slot[n & 1][i], sizeof(T));
}

inline void sync_block() {
  Block& b = *this_block;
  const uint64_t n = b.fibers[b.current].barriers++;
  for (;;) {
    bool all = true;
    for (const Fiber& f : b.fibers) all &= f.done || f.barriers > n;
    if (all) return;
    yield();
  }
}

inline void fiber_entry() {
  Block& b = *this_block;
#if MOEOFFLOAD_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  (*b.kernel)();
  b.fibers[b.current].done = true;
  ++this_warp().returned;
#if MOEOFFLOAD_EMULATION_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.scheduler_stack, b.scheduler_stack_size);  // this fiber ends
#endif
}  // returns to uc_link: the scheduler

// The scheduler's randomness (a fixed seed, so a run repeats): xorshift64.
inline uint64_t next_random() {
  static uint64_t state = 0x9E3779B97F4A7C15ull;
  state ^= state << 13, state ^= state >> 7, state ^= state << 17;
  return state;
}

// Runs kernel(args...) over the grid, a fiber a CUDA thread, one block at a time, each block with
// shared_bytes of dynamic shared memory (poisoned with NaNs: a kernel must write what it reads). Returns 0 (cudaSuccess).
template <typename... Params, typename... Args>
int launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), const Args&... args) {
  constexpr size_t kStack = 256 * 1024;
  gridDim = grid;
  blockDim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  std::vector<unsigned char> shared(shared_bytes);
  const std::function<void()> call = [&] { kernel(args...); };
  static std::vector<std::vector<char>> stacks;  // kept across blocks and launches
  while (static_cast<int>(stacks.size()) < n) stacks.emplace_back(kStack);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.fibers.resize(n);
        b.warps.resize((n + 31) / 32);
        for (int t = 0; t < n; t += 32) b.warps[t / 32].lanes = n - t < 32 ? n - t : 32;
        std::fill(shared.begin(), shared.end(), 0xFF);  // NaN as float32
        b.dynamic_shared = shared.data();
        b.kernel = &call;
        this_block = &b;
        blockIdx = dim3(bx, by, bz);
        for (int t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f.stack = stacks[t].data();
          f.stack_size = kStack;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks[t].data();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        // Each round runs a random half of the warps (at least one), their lanes in a shuffled order, so
        // a warp runs ahead of others by several steps: a kernel that reads what another warp writes
        // without a barrier between gets schedules that break it.
        const int n_warps = (n + 31) / 32;
        std::vector<int> lanes;
        for (bool running = true; running;) {
          running = false;
          std::vector<int> warps;
          for (int w = 0; w < n_warps; ++w) {
            bool live = false;
            for (int t = 32 * w; t < n && t < 32 * w + 32; ++t) live |= !b.fibers[t].done;
            if (live) warps.push_back(w);
          }
          if (warps.empty()) break;
          running = true;
          std::vector<int> chosen;
          for (int w : warps)
            if (next_random() & 1) chosen.push_back(w);
          if (chosen.empty()) chosen.push_back(warps[next_random() % warps.size()]);
          for (int w : chosen) {
            lanes.clear();
            for (int t = 32 * w; t < n && t < 32 * w + 32; ++t) lanes.push_back(t);
            for (size_t i = lanes.size(); i > 1; --i) std::swap(lanes[i - 1], lanes[next_random() % i]);
            for (int t : lanes) {
              if (b.fibers[t].done) continue;
              threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              resume(b, t);
            }
          }
        }
        this_block = nullptr;
      }
  return 0;
}

}  // namespace moeoffload_emulation

inline void __syncthreads() { moeoffload_emulation::sync_block(); }
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

namespace moeoffload_emulation {

// A shuffle: the value of lane source(lane), or the lane's own where source gives a lane outside the warp.
template <typename T, typename Source>
T shuffle(unsigned mask, T v, int width, Source source) {
  if (width != 32) fail("only full-width shuffles are emulated");
  T all[32];
  exchange(mask, v, all);
  const int from = source(static_cast<int>(this_lane()));
  return 0 <= from && from < 32 ? all[from] : v;
}

}  // namespace moeoffload_emulation

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return moeoffload_emulation::shuffle(mask, v, width, [&](int) { return src & 31; });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return moeoffload_emulation::shuffle(mask, v, width, [&](int lane) { return lane - static_cast<int>(delta); });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return moeoffload_emulation::shuffle(mask, v, width, [&](int lane) { return lane + static_cast<int>(delta); });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return moeoffload_emulation::shuffle(mask, v, width, [&](int lane) { return (lane ^ lane_mask) & 31; });
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
