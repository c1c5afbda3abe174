#include "moeoffload/pinned_pool.h"

#include "moeoffload/errors.h"

namespace moeoffload {

PinnedPool::PinnedPool(Backend backend) : backend_(backend), generation_(fork_generation()) {}

PinnedPool::~PinnedPool() { close(); }

void PinnedPool::check_open() const {
  if (closed_) throw Error(ErrorKind::Closed, "PinnedPool is closed");
}

void* PinnedPool::allocate(size_t bytes) {
  const size_t size = round_up(bytes == 0 ? 1 : bytes, kPageSize);
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  void* p = nullptr;
  auto it = free_.find(size);
  if (it != free_.end()) {
    p = it->second;
    free_.erase(it);
  } else {
    p = host_alloc(backend_, size);
    stats_.bytes_reserved += size;
  }
  live_.emplace(p, size);
  stats_.bytes_used += size;
  stats_.allocations += 1;
  stats_.live_allocations += 1;
  return p;
}

void PinnedPool::release(void* p) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  auto it = live_.find(p);
  if (it == live_.end()) throw Error(ErrorKind::InvalidArgument, "PinnedPool.release: pointer was not allocated here");
  free_.emplace(it->second, p);
  stats_.bytes_used -= it->second;
  stats_.live_allocations -= 1;
  live_.erase(it);
}

void PinnedPool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [size, p] : free_) {
    if (frees_here()) host_free(backend_, p);
    stats_.bytes_reserved -= size;
  }
  free_.clear();
}

void PinnedPool::register_range(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  if (registered_.count(p)) throw Error(ErrorKind::InvalidArgument, "PinnedPool.register_range: already registered");
  host_register(backend_, p, bytes);
  registered_.emplace(p, bytes);
  stats_.bytes_registered += bytes;
}

void PinnedPool::unregister_range(void* p) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = registered_.find(p);
  if (it == registered_.end()) return;
  if (frees_here()) host_unregister(backend_, p);
  stats_.bytes_registered -= it->second;
  registered_.erase(it);
}

void PinnedPool::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  if (frees_here()) {
    for (auto& [p, size] : live_) host_free(backend_, p);
    for (auto& [size, p] : free_) host_free(backend_, p);
    for (auto& [p, size] : registered_) host_unregister(backend_, p);
  }
  live_.clear();
  free_.clear();
  registered_.clear();
  stats_.bytes_reserved = stats_.bytes_used = stats_.bytes_registered = 0;
  stats_.live_allocations = 0;
  closed_ = true;
}

bool PinnedPool::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

PinnedPoolStats PinnedPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace moeoffload
