#include "moeoffload/device_cache.h"

#include <chrono>
#include <iterator>

#include "moeoffload/arrival.h"
#include "moeoffload/errors.h"

namespace moeoffload {

DeviceCache::DeviceCache(uint64_t budget, EvictionPolicy policy, ExpertStore& store, TransferEngine& engine)
    : budget_(budget),
      store_(store),
      engine_(engine),
      backend_(engine.backend()),
      max_slot_bytes_(std::max<uint64_t>(1, store.max_resident_bytes())),
      index_(budget, policy, store.num_layers(), store.experts_per_layer(), max_slot_bytes_) {
  if (store.total_bytes() == 0) throw Error(ErrorKind::InvalidArgument, "DeviceCache over an empty ExpertStore");
  base_ = static_cast<uint8_t*>(device_alloc(backend_, budget_));
  engine_.reserve_staging(store.max_payload_bytes());  // (used only if an expert is coded)
}

DeviceCache::~DeviceCache() {
  try {
    close();
  } catch (...) {
  }
}

void DeviceCache::check_open() const {
  if (closed_) throw Error(ErrorKind::Closed, "DeviceCache is closed");
}

void DeviceCache::refresh_locked() {
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    if (!it->second->done() || (it->second->failed() && index_.pins(it->first) > 0)) {
      ++it;  // still copying, or failed and still held: it keeps its slot and its error until released
      continue;
    }
    if (it->second->failed())
      index_.abort_loading(it->first);
    else
      index_.mark_ready(it->first);
    it = in_flight_.erase(it);
  }
}

std::shared_ptr<Transfer> DeviceCache::next_copy_locked() const {
  for (const auto& [id, transfer] : in_flight_)
    if (!transfer->done()) return transfer;
  return nullptr;
}

std::shared_ptr<Transfer> DeviceCache::fetch_locked(uint32_t id, const Payload& payload, uint64_t offset) {
  store_.check_file();
  const uint64_t end = offset + store_.resident_bytes(id);
  std::vector<std::shared_ptr<const Fence>> after;
  std::vector<std::multimap<uint64_t, Fenced>::iterator> done;  // needed by no copy after this one
  // The fences of slots that overlap [offset, end): those starting less than a slot's size before it.
  for (auto it = fences_.lower_bound(offset >= max_slot_bytes_ ? offset - max_slot_bytes_ + 1 : 0);
       it != fences_.end() && it->first < end; ++it) {
    const uint64_t at = it->first, bytes = it->second.bytes;
    if (at + bytes <= offset) continue;
    after.push_back(it->second.fence);
    // A fence inside this slot is passed before the copy writes (the engine waits for the copy's
    // stream and fences before it reports even a failed copy), and the copy lands before anything can evict it
    // and write here again: this copy is the last that needs it.
    if ((offset <= at && at + bytes <= end) || it->second.fence->passed()) done.push_back(it);
  }
  auto transfer = engine_.copy(payload.data, base_ + offset, payload.bytes, id, {},
                               arrival_for(store_, id, backend_), std::move(after));
  for (auto it : done) fences_.erase(it);  // only once the copy that waits for them is queued
  return transfer;
}

std::shared_ptr<const Fence> DeviceCache::fence_for(std::optional<void*> stream) const {
  return stream && backend_ == Backend::Cuda ? std::make_shared<const Fence>(*stream) : nullptr;
}

void DeviceCache::fence_locked(uint32_t id, std::shared_ptr<const Fence> fence) {
  if (!fence) return;
  const uint64_t at = index_.offset(id), bytes = store_.resident_bytes(id);
  // The slot's earlier fences go once the device has passed them. One not yet passed stays even when
  // the same stream handle made it: a stream destroyed with work still queued hands its handle to the
  // next stream created, whose new fence says nothing about the old stream's work.
  auto [it, last] = fences_.equal_range(at);
  while (it != last) it = it->second.bytes == bytes && it->second.fence->passed() ? fences_.erase(it) : std::next(it);
  fences_.emplace(at, Fenced{bytes, std::move(fence)});
}

Slot DeviceCache::acquire(uint32_t id, double timeout_s) {
  const Payload payload = store_.payload(id);
  const uint64_t resident = store_.resident_bytes(id);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  std::unique_lock<std::mutex> lock(mu_);
  check_open();
  refresh_locked();
  Slot slot;
  slot.id = id;
  slot.bytes = resident;
  slot.lookup = index_.access(id);
  while (slot.lookup == Lookup::Miss) {
    if (index_.contains(id)) break;  // another thread fetched it while we waited
    try {
      const uint64_t offset = index_.insert_demand(id, resident);
      try {
        in_flight_[id] = fetch_locked(id, payload, offset);
      } catch (...) {
        index_.abort_loading(id);  // the copy never started: no entry, no budget held
        throw;
      }
      break;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::CacheFull) throw;
      // (in a forked child nothing can free a slot: no copy lands and no other thread releases)
      if (released_.forked()) {  // a miss needs a copy, which a child never gets: say so, not "full"
        index_.uncount_miss();
        throw Error(ErrorKind::Forked, "this cache (ExpertCache) was created before fork(): its copy threads do "
                                       "not exist in this child process. Build a new one in the child");
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        index_.uncount_miss();  // nothing was fetched: this acquire did not happen
        throw;
      }
    }
    // Every slot is pinned or loading: wait for a copy to land or a release.
    if (auto t = next_copy_locked()) {
      lock.unlock();
      try {
        t->wait();
      } catch (const Error& e) {
        if (e.kind() == ErrorKind::Forked) throw;  // it will never land
      }
      lock.lock();
    } else {
      released_->wait_until(lock, deadline);
    }
    check_open();
    refresh_locked();
  }
  index_.pin(id);
  slot.data = base_ + index_.offset(id);
  auto it = in_flight_.find(id);
  if (it != in_flight_.end()) slot.transfer = it->second;
  return slot;
}

std::vector<Slot> DeviceCache::acquire_ahead(const uint32_t* ids, size_t n, bool holding_pins, double timeout_s) {
  std::vector<Slot> slots;
  slots.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    try {
      slots.push_back(acquire(ids[i], holding_pins || !slots.empty() ? 0.0 : timeout_s));
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::CacheFull && (!slots.empty() || holding_pins)) break;  // no room until the caller releases
      for (const Slot& s : slots) release(s.id);  // any other failure: the caller gets no slots, so none stays pinned
      throw;
    }
  }
  return slots;
}

void DeviceCache::release_all(const uint32_t* ids, size_t n, std::optional<void*> stream) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  for (size_t i = 0; i < n; ++i) {  // all or nothing: every id must be held as often as it is named
    int named = 0;
    for (size_t j = 0; j < n; ++j) named += ids[j] == ids[i];
    if (index_.pins(ids[i]) < named)
      throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(ids[i]) + " is not in use (" +
                                                  std::to_string(named) + " releases named)");
  }
  unpin_locked(ids, n, stream);
}

void DeviceCache::release(uint32_t id, std::optional<void*> stream) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  unpin_locked(&id, 1, stream);
}

void DeviceCache::unpin_locked(const uint32_t* ids, size_t n, std::optional<void*> stream) {
  for (size_t i = 0; i < n; ++i) index_.unpin(ids[i]);  // an expert not in use raises before anything changed
  // A waiter needs mu_, held until the fences are in place. (Not in a forked child: a wake may wait for
  // the parent's waiters, which do not exist there.)
  if (!released_.forked()) released_->notify_all();
  // One fence for them all (the same stream's work so far). Made after the unpins: when CUDA refuses it,
  // the experts are released all the same (a caller's finally forgets them), after a host wait for the
  // stream (fence.cpp), and the error is raised.
  const auto fence = fence_for(stream);
  for (size_t i = 0; i < n; ++i) fence_locked(ids[i], fence);
  // Then a failed fetch its last holder released is dropped; its fence stays on its bytes (a kernel
  // ordered after the copy's event may have read them before the copy was known to fail).
  refresh_locked();
}

bool DeviceCache::prefetch(uint32_t id, double priority) {
  const Payload payload = store_.payload(id);
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  refresh_locked();
  auto offset = index_.insert_prefetch(id, store_.resident_bytes(id), priority);
  if (!offset) return false;
  try {
    in_flight_[id] = fetch_locked(id, payload, *offset);
  } catch (...) {
    index_.abort_loading(id);
    throw;
  }
  return true;
}

std::vector<uint32_t> DeviceCache::apply(const Decision& decision) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_open();
    apply_priorities(decision, index_);
  }
  std::vector<uint32_t> started;
  for (const auto& item : decision.plan)
    if (prefetch(item.id, item.priority)) started.push_back(item.id);
  return started;
}

void DeviceCache::set_current_layer(uint32_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  index_.set_current_layer(layer);
}

void DeviceCache::set_activation(const float* a, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  index_.set_activation(a, n);
}

bool DeviceCache::contains(uint32_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.contains(id);
}

bool DeviceCache::ready(uint32_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  refresh_locked();
  return index_.ready(id);
}

std::vector<uint32_t> DeviceCache::resident() {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.resident();
}

uint64_t DeviceCache::used_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.used_bytes();
}

CacheStats DeviceCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.stats();
}

void DeviceCache::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.reset_stats();
}

void DeviceCache::check_invariants() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.check_invariants();
}

void DeviceCache::synchronize() {
  for (;;) {
    std::shared_ptr<Transfer> t;
    {
      std::lock_guard<std::mutex> lock(mu_);
      refresh_locked();
      t = next_copy_locked();
      if (!t) return;
    }
    try {
      t->wait();
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::Forked) throw;  // it will never land
      // A failed copy is retired (its slot dropped) by the next refresh.
    }
  }
}

std::optional<Slot> DeviceCache::pinned_slot(uint32_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  refresh_locked();
  if (!index_.contains(id) || index_.pins(id) == 0) return std::nullopt;
  Slot slot;
  slot.id = id;
  slot.data = base_ + index_.offset(id);
  slot.bytes = store_.resident_bytes(id);
  auto it = in_flight_.find(id);
  if (it != in_flight_.end()) slot.transfer = it->second;
  return slot;
}

void DeviceCache::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;  // no new fetches from here on
    if (released_.forked()) {  // a child forked after the cache was made: no copy lands, no CUDA call
      in_flight_.clear();
      fences_.clear();  // (a fence made before fork() leaks its event here: fence.h)
      if (backend_ == Backend::Cpu) device_free(backend_, base_);
      base_ = nullptr;
      return;
    }
  }
  synchronize();
  std::lock_guard<std::mutex> lock(mu_);
  fences_.clear();
  device_free(backend_, base_);
  base_ = nullptr;
}

}  // namespace moeoffload
