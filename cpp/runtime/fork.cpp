#include "moeoffload/fork.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <utility>
#include <vector>

namespace moeoffload {

namespace {

struct Held {
  int rank;
  void* mu;  // a std::mutex or a std::shared_mutex, which fork takes exclusively
  void (*lock)(void*);
  void (*unlock)(void*);
  void (*unlock_in_child)(void*);
};

struct Registry {
  std::mutex mu;
  std::vector<Held> held;  // by rank, then in registration order
};

// Never destroyed: a handler may run during exit, after static destructors.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

template <class M>
void lock(void* m) {
  static_cast<M*>(m)->lock();
}
template <class M>
void unlock(void* m) {
  static_cast<M*>(m)->unlock();
}
// glibc's rwlock knows its writer by thread id, and the child's one thread has a new id: its unlock
// would take it for a reader's. The child's is made new instead (no thread of the child holds it;
// a pthread rwlock owns no other resource, so nothing leaks).
void renew_shared_mutex(void* m) { new (m) std::shared_mutex(); }

Held held(std::mutex& mu, int rank) { return Held{rank, &mu, lock<std::mutex>, unlock<std::mutex>, unlock<std::mutex>}; }
Held held(std::shared_mutex& mu, int rank) {
  return Held{rank, &mu, lock<std::shared_mutex>, unlock<std::shared_mutex>, renew_shared_mutex};
}

void add(Held h) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto at = std::find_if(r.held.begin(), r.held.end(), [&](const Held& e) { return e.rank > h.rank; });
  r.held.insert(at, h);
}

std::atomic<uint64_t> g_generation{0};

void before_fork() {
  Registry& r = registry();
  r.mu.lock();  // no mutex is registered or unregistered until both sides unlock
  for (const Held& h : r.held) h.lock(h.mu);
}

void after_fork(bool child) {  // the forking thread took them all, and is in both processes
  Registry& r = registry();
  for (auto it = r.held.rbegin(); it != r.held.rend(); ++it) (child ? it->unlock_in_child : it->unlock)(it->mu);
  r.mu.unlock();
}

const bool g_handlers = [] {
  registry();
  pthread_atfork(before_fork, [] { after_fork(false); }, [] {
    g_generation.fetch_add(1);
    after_fork(true);
  });
  return true;
}();

}  // namespace

uint64_t fork_generation() {
  (void)g_handlers;
  return g_generation.load();
}

HeldAcrossFork::HeldAcrossFork(std::mutex& mu, int rank) : mu_(&mu) { add(held(mu, rank)); }

HeldAcrossFork::HeldAcrossFork(std::shared_mutex& mu, int rank) : mu_(&mu) { add(held(mu, rank)); }

HeldAcrossFork::~HeldAcrossFork() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.held.erase(std::find_if(r.held.begin(), r.held.end(), [&](const Held& e) { return e.mu == mu_; }));
}

}  // namespace moeoffload
