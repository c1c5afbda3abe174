// A small fork-join parallel_for for the CPU backend, on a persistent pool of
// threads (started on first use: starting threads per call halved decode speed
// on small matrices); small inputs run inline on the caller's thread.
#pragma once
#include <cstdint>
#include <functional>

namespace moeoffload {

// Threads the CPU backend uses: set_num_threads, else MOEOFFLOAD_NUM_THREADS, else the hardware
// count (the two read once, at the first call).
int num_threads();
void set_num_threads(int n);  // n <= 0 restores the default
// Joins the pool's threads (the Python package calls it at exit); the next
// parallel_for starts them again.
void stop_threads();

// Calls fn(begin, end) over disjoint chunks covering [0, n). Chunks hold at
// least `grain` items. The first exception thrown by any chunk is rethrown.
void parallel_for(uint64_t n, uint64_t grain, const std::function<void(uint64_t, uint64_t)>& fn);

}  // namespace moeoffload
