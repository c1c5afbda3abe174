// Compressed experts resident on the device, inside one allocation of
// `budget` bytes. A slot holds what the kernels read (szp), which for an szpe
// expert is more than crossed the bus (ExpertStore::resident_bytes). acquire() pins an expert and returns its slot, fetching it
// through the TransferEngine on a miss (evicting by policy); release() unpins.
// prefetch() starts a fetch only when it displaces nothing more valuable. A fetch that fails keeps its
// slot, and its error for whoever acquires it, until its last holder releases it; then the slot is
// dropped and the next acquire fetches the expert again.
// On cuda a caller whose kernels reading a slot are still queued on its stream releases it with that
// stream: the slot's bytes then keep a fence (fence.h), and a later fetch into them waits for it on
// its copy stream.
// Thread-safe: every call takes one lock, never held while waiting on a copy.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "moeoffload/cache_index.h"
#include "moeoffload/decision.h"
#include "moeoffload/expert_store.h"
#include "moeoffload/fence.h"
#include "moeoffload/fork.h"
#include "moeoffload/transfer_engine.h"

namespace moeoffload {

struct Slot {
  uint32_t id = 0;
  uint8_t* data = nullptr;  // device pointer on cuda
  uint64_t bytes = 0;
  Lookup lookup = Lookup::Hit;
  std::shared_ptr<Transfer> transfer;  // null when the slot was ready
  // Blocks until the bytes are in the slot (no-op when ready).
  void wait(double timeout_s = -1.0) const {
    if (transfer) transfer->wait(timeout_s);
  }
};

class DeviceCache {
 public:
  DeviceCache(uint64_t budget, EvictionPolicy policy, ExpertStore& store, TransferEngine& engine);
  ~DeviceCache();
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  // Pins `id` (fetching it on a miss); pair with release(). When every slot
  // is pinned or in flight it waits up to `timeout_s` for one to free up,
  // then raises CacheFull.
  Slot acquire(uint32_t id, double timeout_s = 10.0);
  // Unpins `id`. `stream` (cuda, a cudaStream_t; nullptr is the default stream, as torch's handle 0):
  // the work queued on it so far may still read the slot, and its bytes are not overwritten before that
  // work is done. Without a stream the caller knows that work is done.
  void release(uint32_t id, std::optional<void*> stream = std::nullopt);
  // A layer's experts in one call: pins ids in order while the budget has room. The first waits up
  // to timeout_s when the caller holds no pins (holding_pins false), else nothing waits: a caller
  // holding pins would wait for itself. Returns the slots of a prefix of ids; CacheFull only when
  // not even the first fits.
  std::vector<Slot> acquire_ahead(const uint32_t* ids, size_t n, bool holding_pins, double timeout_s = 10.0);
  void release_all(const uint32_t* ids, size_t n, std::optional<void*> stream = std::nullopt);
  // The slot of `id` when some caller holds it pinned (acquired, not yet
  // released); nullopt otherwise. Ops reach an expert's bytes through it.
  std::optional<Slot> pinned_slot(uint32_t id);
  bool closed() const { return closed_; }
  bool prefetch(uint32_t id, double priority);
  // A decision step's outcome: the layer now running, the activation priorities, then the
  // plan's prefetches in order. Returns the ids whose fetch started.
  std::vector<uint32_t> apply(const Decision& decision);
  void set_current_layer(uint32_t layer);
  void set_activation(const float* a, size_t n);

  bool contains(uint32_t id);
  bool ready(uint32_t id);
  std::vector<uint32_t> resident();
  uint64_t used_bytes();
  uint64_t budget() const { return budget_; }
  CacheStats stats();
  void reset_stats();
  void check_invariants();
  void synchronize();  // waits for every fetch in flight
  void close();        // waits for fetches, frees the device memory

 private:
  void refresh_locked();  // retires landed copies, and failed ones nobody holds (dropping their slots)
  // Starts the copy of `id` into the slot at `offset` (expanded on arrival: arrival.h), after the fences
  // of the bytes it overwrites.
  std::shared_ptr<Transfer> fetch_locked(uint32_t id, const Payload& payload, uint64_t offset);
  // The fence of a release with a stream, on the released slot's bytes (cuda; nullptr otherwise).
  std::shared_ptr<const Fence> fence_for(std::optional<void*> stream) const;
  void fence_locked(uint32_t id, std::shared_ptr<const Fence> fence);
  void unpin_locked(const uint32_t* ids, size_t n, std::optional<void*> stream);
  void check_open() const;
  std::shared_ptr<Transfer> next_copy_locked() const;  // one of in_flight_ not done yet, or nullptr
  uint64_t budget_;
  ExpertStore& store_;
  TransferEngine& engine_;
  Backend backend_;
  uint8_t* base_ = nullptr;
  std::mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, 0};  // taken before the engine's: fetch_locked copies under it
  ParentOnly<std::condition_variable> released_;
  uint64_t max_slot_bytes_;  // the largest expert's resident bytes (at least 1)
  CacheIndex index_;
  std::unordered_map<uint32_t, std::shared_ptr<Transfer>> in_flight_;
  // Released slots' bytes that kernels queued on some stream may still read, by offset: a slot keeps
  // the fences of its releases until the device has passed them or a copy into it has waited for them.
  struct Fenced {
    uint64_t bytes;
    std::shared_ptr<const Fence> fence;
  };
  std::multimap<uint64_t, Fenced> fences_;
  bool closed_ = false;
};

}  // namespace moeoffload
