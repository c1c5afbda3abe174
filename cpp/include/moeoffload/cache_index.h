// The decisions of the device cache, without memory: which experts are
// resident, where their slots lie, what to evict. DeviceCache wraps it with
// real memory, transfers and a lock; moeoffload.sim.replay drives it on a
// recorded trace. Not thread-safe on its own.
//
// Policies (the victim is the evictable entry with the lowest key):
//   lru         key = last use
//   lfu         key = (uses, last use)
//   activation  key = (activation priority, last use), where the activation
//               priority of an expert of layer l is (MoE-Infinity)
//                 a[l][e] * (1 - d / L),  d = (l - current layer) mod L,
//               a = the predicted activation set with set_activation().
// Pinned entries (in use) and loading entries (in flight) are never evicted;
// slots never exceed the budget.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moeoffload/arena.h"

namespace moeoffload {

enum class EvictionPolicy { Lru, Lfu, Activation };
EvictionPolicy parse_eviction_policy(const std::string& name);
const char* eviction_policy_name(EvictionPolicy p);

enum class Lookup { Hit = 0, InFlight = 1, Miss = 2 };

struct CacheStats {
  uint64_t accesses = 0;
  uint64_t hits = 0;           // resident and ready
  uint64_t inflight_hits = 0;  // resident, still loading: the access waits (a stall)
  uint64_t misses = 0;         // demand misses: absent, fetched on demand
  uint64_t prefetches = 0;     // entries inserted by prefetch
  uint64_t prefetch_hits = 0;  // first accesses of prefetched entries (ready or in flight)
  uint64_t prefetch_unused = 0;  // prefetched entries evicted before any use
  uint64_t evictions = 0;
  uint64_t bytes_loaded = 0;
  uint64_t peak_used = 0;
};

class CacheIndex {
 public:
  CacheIndex(uint64_t budget, EvictionPolicy policy, uint32_t num_layers, uint32_t experts_per_layer,
             uint64_t max_expert_bytes);

  // A demand access: counts a hit, an in-flight hit or a miss, and marks use. Its layer becomes
  // the current layer (the activation policy's distances are counted from it).
  Lookup access(uint32_t id);
  // Takes back the counts of a miss whose fetch never happened (the cache was full until the caller
  // gave up): an acquire that fails is not an access.
  void uncount_miss();
  // Inserts `id` as loading and returns its slot offset, evicting by policy.
  // Raises CacheFull when pinned and loading entries leave no room.
  uint64_t insert_demand(uint32_t id, uint64_t bytes, std::vector<uint32_t>* evicted = nullptr);
  // Inserts `id` for a prefetch of priority `priority` (an activation
  // priority), evicting only ready, unpinned entries of lower activation
  // priority. nullopt (nothing changed) when that cannot make room.
  std::optional<uint64_t> insert_prefetch(uint32_t id, uint64_t bytes, double priority,
                                          std::vector<uint32_t>* evicted = nullptr);
  void mark_ready(uint32_t id);
  // Drops a loading entry whose copy failed.
  void abort_loading(uint32_t id);
  void pin(uint32_t id);
  void unpin(uint32_t id);

  void set_current_layer(uint32_t layer);
  void set_activation(const float* a, size_t n);  // [layers * experts], row per layer; finite
  double activation_priority(uint32_t id) const;

  bool contains(uint32_t id) const { return entries_.count(id) != 0; }
  bool ready(uint32_t id) const;
  bool loading(uint32_t id) const;
  int pins(uint32_t id) const;
  uint64_t offset(uint32_t id) const;
  std::vector<uint32_t> resident() const;
  std::vector<uint32_t> loading_ids() const;
  uint64_t used_bytes() const { return arena_.used(); }
  uint64_t budget() const { return budget_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t experts_per_layer() const { return experts_per_layer_; }
  EvictionPolicy policy() const { return policy_; }
  const CacheStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CacheStats{}; }
  // Throws InvalidArgument naming the first broken invariant: slots inside the
  // budget, disjoint, accounted; pins non-negative.
  void check_invariants() const;

 private:
  struct Entry {
    uint64_t bytes, offset;
    uint32_t layer = 0;
    bool loading = true, prefetched = false, used = false;
    int pins = 0;
    uint64_t last_use = 0, uses = 0;
    bool evictable() const { return pins == 0 && !loading; }
  };
  // id -> Entry: a dense list to walk, a list of ids per layer, and a position per id to find one in O(1).
  class Entries {
   public:
    Entries(size_t ids, uint32_t layers) : where_(ids, -1), in_layer_(ids, 0), layers_(layers) {}
    Entry* find(uint32_t id) { return id < where_.size() && where_[id] >= 0 ? &items_[where_[id]].second : nullptr; }
    const Entry* find(uint32_t id) const { return const_cast<Entries*>(this)->find(id); }
    bool count(uint32_t id) const { return find(id) != nullptr; }
    void emplace(uint32_t id, const Entry& e) {
      where_[id] = static_cast<int64_t>(items_.size());
      items_.emplace_back(id, e);
      in_layer_[id] = static_cast<uint32_t>(layers_[e.layer].size());
      layers_[e.layer].push_back(id);
    }
    void erase(uint32_t id) {
      const int64_t w = where_[id];
      if (w < 0) return;
      std::vector<uint32_t>& ids = layers_[items_[w].second.layer];
      ids[in_layer_[id]] = ids.back();
      in_layer_[ids.back()] = in_layer_[id];
      ids.pop_back();
      items_[w] = items_.back();
      where_[items_[w].first] = w;
      items_.pop_back();
      where_[id] = -1;
    }
    const std::vector<uint32_t>& layer(uint32_t l) const { return layers_[l]; }
    size_t size() const { return items_.size(); }
    auto begin() const { return items_.begin(); }
    auto end() const { return items_.end(); }

   private:
    std::vector<int64_t> where_;
    std::vector<uint32_t> in_layer_;
    std::vector<std::vector<uint32_t>> layers_;
    std::vector<std::pair<uint32_t, Entry>> items_;
  };
  using Key = std::pair<double, double>;
  // The victim order is the key (lru: last use; lfu: uses, last use; activation: priority, last use),
  // then the smaller id. Within one layer the same order follows from layer_key, the activation
  // priority without the layer's distance weight (> 0 and common to the layer, so it cannot reorder
  // it): each layer's smallest entry is kept, and the victim is the smallest of those. A change of
  // layer reorders layers but no layer's entries, so it costs nothing.
  Key layer_key(uint32_t id, const Entry& e) const;
  double priority_of(uint32_t id, const Entry& e) const { return activation_[id] * distance_weight_[e.layer]; }
  void set_layer(uint32_t layer);  // current_layer_ and distance_weight_
  // Keeps the layer's smallest entry current after `id` changed: its key grew, or it became evictable
  // or not. forget(): `id` leaves the cache.
  void touched(uint32_t id, const Entry& e);
  void forget(uint32_t id, const Entry& e);
  struct LayerMin {
    bool known = false;  // false: rescan the layer when it is next needed
    std::optional<uint32_t> id;
    Key key{};  // layer_key of id
  };
  const LayerMin& layer_min(uint32_t layer) { return layer_min_[layer].known ? layer_min_[layer] : rescan(layer); }
  const LayerMin& rescan(uint32_t layer);  // the layer's smallest evictable entry
  std::optional<uint32_t> pick_victim(std::optional<double> below_activation);
  void evict(uint32_t id, std::vector<uint32_t>* evicted);
  uint64_t place(uint32_t id, uint64_t bytes, bool prefetched, uint64_t offset);
  void check_id(uint32_t id) const;
  Entry& entry(uint32_t id);
  const Entry& entry(uint32_t id) const;

  uint64_t budget_;
  EvictionPolicy policy_;
  uint32_t num_layers_, experts_per_layer_;
  Arena arena_;
  Entries entries_;
  std::vector<float> activation_;
  uint32_t current_layer_ = 0;
  std::vector<double> distance_weight_;  // [layers]: 1 - d / L, d = layers ahead of the current one
  uint64_t clock_ = 0;
  std::vector<LayerMin> layer_min_;  // [layers]
  CacheStats stats_;
};

}  // namespace moeoffload
