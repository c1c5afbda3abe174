#include "moeoffload/fork.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

namespace moeoffload {

namespace {

struct Registry {
  std::mutex mu;
  std::vector<std::pair<int, std::mutex*>> held;  // by rank, then in registration order
};

// Never destroyed: a handler may run during exit, after static destructors.
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

std::atomic<uint64_t> g_generation{0};

void before_fork() {
  Registry& r = registry();
  r.mu.lock();  // no mutex is registered or unregistered until both sides unlock
  for (auto& [rank, mu] : r.held) mu->lock();
}

void after_fork() {  // parent and child: the forking thread took them all, and is in both
  Registry& r = registry();
  for (auto it = r.held.rbegin(); it != r.held.rend(); ++it) it->second->unlock();
  r.mu.unlock();
}

const bool g_handlers = [] {
  registry();
  pthread_atfork(before_fork, after_fork, [] {
    g_generation.fetch_add(1);
    after_fork();
  });
  return true;
}();

}  // namespace

uint64_t fork_generation() {
  (void)g_handlers;
  return g_generation.load();
}

HeldAcrossFork::HeldAcrossFork(std::mutex& mu, int rank) : mu_(mu) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto at = std::find_if(r.held.begin(), r.held.end(), [&](const auto& e) { return e.first > rank; });
  r.held.insert(at, {rank, &mu});
}

HeldAcrossFork::~HeldAcrossFork() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.held.erase(std::find_if(r.held.begin(), r.held.end(), [&](const auto& e) { return e.second == &mu_; }));
}

}  // namespace moeoffload
