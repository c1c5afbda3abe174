// What the runtime keeps sound across fork(). A forked child has only the thread that forked: the
// copy threads are gone, and with them any lock they held and any wait they were in. So:
// - fork_generation() counts the forks this process descends from; objects that own threads record
//   it, and raise Forked when used in a later one.
// - HeldAcrossFork: the mutexes of the decision steps, the cache, the store, the pool and the engine,
//   and the read-write lock of the host matrices (compressed tensors outside a runtime), are
//   registered, and fork() takes every one of them before it copies the process (pthread_atfork), so a
//   child never inherits one locked by a thread it does not have, nor the state behind it half
//   changed. A read-write lock is taken exclusively: fork waits for the ops reading through it (their
//   threads start one only with the GIL, which the forking thread holds). (The runtime's op lock is
//   not registered: its ops may wait on copies; a child never takes it, as the runtime raises Forked
//   there, while a child's compressed tensors work as in the parent.)
// - ParentOnly<T>: glibc's pthread_cond_destroy waits until every thread that waited on the variable
//   has left it, which the parent's threads never do in a child; a condition variable (and what
//   else must not be torn down there) is held in a ParentOnly, which a child leaks instead of destroying.
#pragma once
#include <cstdint>
#include <mutex>
#include <shared_mutex>

namespace moeoffload {

uint64_t fork_generation();

class HeldAcrossFork {
 public:
  // rank: fork takes lower ranks first; a thread holding a mutex of one rank may go on to take one of
  // a higher rank, never the reverse: a decision step (-1) applies its plan through the device cache
  // (0), which reads the expert store (1), which hands blocks back to the pinned pool (2), and copies
  // through the engine (3). The host matrices' locks (-2) are taken first: fork waits for the ops
  // reading through them, which take none of the others and never wait for a second host matrices'
  // lock while they hold one (lock_both). A holder must never wait for the GIL: fork() is called
  // holding it.
  HeldAcrossFork(std::mutex& mu, int rank);
  HeldAcrossFork(std::shared_mutex& mu, int rank);
  ~HeldAcrossFork();
  HeldAcrossFork(const HeldAcrossFork&) = delete;
  HeldAcrossFork& operator=(const HeldAcrossFork&) = delete;

 private:
  void* mu_;
};

template <class T>
class ParentOnly {
 public:
  ParentOnly() : value_(new T()), generation_(fork_generation()) {}
  ~ParentOnly() {
    if (generation_ == fork_generation()) delete value_;  // else leaked: see above
  }
  ParentOnly(const ParentOnly&) = delete;
  ParentOnly& operator=(const ParentOnly&) = delete;
  T& operator*() const { return *value_; }
  T* operator->() const { return value_; }
  bool forked() const { return generation_ != fork_generation(); }

 private:
  T* value_;
  uint64_t generation_;
};

}  // namespace moeoffload
