// Host memory for compressed experts: pinned on cuda (so copies are DMA, async),
// page-aligned on cpu. Freed blocks are kept for reuse by size; close() (or the
// destructor) returns everything, and memory the pool registered (a mapped
// table file) is unregistered.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "moeoffload/fork.h"
#include "moeoffload/memory.h"

namespace moeoffload {

struct PinnedPoolStats {
  uint64_t bytes_reserved = 0;    // held from the system (used + cached for reuse)
  uint64_t bytes_used = 0;        // in live allocations
  uint64_t bytes_registered = 0;  // external memory pinned in place
  uint64_t allocations = 0;       // allocate() calls so far
  uint64_t live_allocations = 0;
};

class PinnedPool {
 public:
  explicit PinnedPool(Backend backend);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  void* allocate(size_t bytes);  // page-aligned; size rounded up to whole pages
  void release(void* p);         // back to the pool for reuse
  void trim();                   // return cached free blocks to the system
  void register_range(void* p, size_t bytes);
  void unregister_range(void* p);
  void close();
  bool closed() const;
  Backend backend() const { return backend_; }
  PinnedPoolStats stats() const;

 private:
  void check_open() const;
  // False in a child forked after a cuda pool was made: no CUDA there, so its blocks are leaked, not freed.
  bool frees_here() const { return backend_ == Backend::Cpu || generation_ == fork_generation(); }
  Backend backend_;
  uint64_t generation_;
  mutable std::mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, 2};
  bool closed_ = false;
  std::unordered_map<void*, size_t> live_;
  std::multimap<size_t, void*> free_;  // rounded size -> block
  std::unordered_map<void*, size_t> registered_;
  PinnedPoolStats stats_;
};

}  // namespace moeoffload
