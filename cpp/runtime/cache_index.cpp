#include "moeoffload/cache_index.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "moeoffload/errors.h"

namespace moeoffload {

EvictionPolicy parse_eviction_policy(const std::string& name) {
  if (name == "lru") return EvictionPolicy::Lru;
  if (name == "lfu") return EvictionPolicy::Lfu;
  if (name == "activation") return EvictionPolicy::Activation;
  throw Error(ErrorKind::InvalidArgument, "unknown cache policy '" + name + "' (expected lru, lfu or activation)");
}

const char* eviction_policy_name(EvictionPolicy p) {
  switch (p) {
    case EvictionPolicy::Lru: return "lru";
    case EvictionPolicy::Lfu: return "lfu";
    case EvictionPolicy::Activation: return "activation";
  }
  return "?";
}

CacheIndex::CacheIndex(uint64_t budget, EvictionPolicy policy, uint32_t num_layers, uint32_t experts_per_layer,
                       uint64_t max_expert_bytes)
    : budget_(budget), policy_(policy), num_layers_(num_layers), experts_per_layer_(experts_per_layer), arena_(budget),
      entries_(static_cast<size_t>(num_layers) * experts_per_layer, num_layers), layer_min_(num_layers) {
  if (num_layers == 0 || experts_per_layer == 0)
    throw Error(ErrorKind::InvalidArgument, "a cache needs at least one layer and one expert");
  if (max_expert_bytes == 0) throw Error(ErrorKind::InvalidArgument, "max_expert_bytes must be positive");
  if (arena_.capacity() < Arena::slot_size(max_expert_bytes))
    throw Error(ErrorKind::Budget, "cache budget of " + std::to_string(budget) +
                                       " bytes cannot hold the largest expert (" + std::to_string(max_expert_bytes) +
                                       " bytes, a slot of " + std::to_string(Arena::slot_size(max_expert_bytes)) +
                                       "): raise the budget");
  // Until a prediction arrives every expert is equally likely.
  activation_.assign(static_cast<size_t>(num_layers) * experts_per_layer, 1.0f / experts_per_layer);
  set_layer(0);
}

void CacheIndex::check_id(uint32_t id) const {
  if (id >= num_layers_ * experts_per_layer_)
    throw Error(ErrorKind::InvalidArgument, "expert id " + std::to_string(id) + " out of range (" +
                                                std::to_string(num_layers_) + " layers x " +
                                                std::to_string(experts_per_layer_) + " experts)");
}

CacheIndex::Entry& CacheIndex::entry(uint32_t id) {
  Entry* e = entries_.find(id);
  if (!e) throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " is not cached");
  return *e;
}

const CacheIndex::Entry& CacheIndex::entry(uint32_t id) const { return const_cast<CacheIndex*>(this)->entry(id); }

Lookup CacheIndex::access(uint32_t id) {
  check_id(id);
  set_layer(id / experts_per_layer_);  // a demand access names the layer that runs now
  stats_.accesses += 1;
  Entry* found = entries_.find(id);
  if (!found) {
    stats_.misses += 1;
    return Lookup::Miss;
  }
  Entry& e = *found;
  if (e.prefetched && !e.used) stats_.prefetch_hits += 1;
  e.used = true;
  e.last_use = ++clock_;
  e.uses += 1;
  touched(id, e);  // its key grew
  if (e.loading) {
    stats_.inflight_hits += 1;
    return Lookup::InFlight;
  }
  stats_.hits += 1;
  return Lookup::Hit;
}

void CacheIndex::uncount_miss() {
  stats_.accesses -= 1;
  stats_.misses -= 1;
}

double CacheIndex::activation_priority(uint32_t id) const {
  check_id(id);
  return activation_[id] * distance_weight_[id / experts_per_layer_];
}

void CacheIndex::set_layer(uint32_t layer) {
  if (layer == current_layer_ && !distance_weight_.empty()) return;
  current_layer_ = layer;  // reorders layers, not the entries of one (layer_key)
  distance_weight_.resize(num_layers_);
  for (uint32_t l = 0; l < num_layers_; ++l) {
    const uint32_t dist = (l + num_layers_ - layer) % num_layers_;
    distance_weight_[l] = 1.0 - static_cast<double>(dist) / num_layers_;
  }
}

CacheIndex::Key CacheIndex::layer_key(uint32_t id, const Entry& e) const {
  switch (policy_) {
    case EvictionPolicy::Lru: return {static_cast<double>(e.last_use), 0.0};
    case EvictionPolicy::Lfu: return {static_cast<double>(e.uses), static_cast<double>(e.last_use)};
    case EvictionPolicy::Activation: return {activation_[id], static_cast<double>(e.last_use)};
  }
  return {0.0, 0.0};
}

void CacheIndex::touched(uint32_t id, const Entry& e) {
  LayerMin& m = layer_min_[e.layer];
  if (!m.known) return;
  if (m.id == id) {
    m.known = false;  // the smallest grew or stopped being evictable: the next one is unknown
    return;
  }
  if (!e.evictable()) return;
  const Key k = layer_key(id, e);
  if (!m.id || k < m.key || (k == m.key && id < *m.id)) {
    m.id = id;
    m.key = k;
  }
}

void CacheIndex::forget(uint32_t id, const Entry& e) {
  LayerMin& m = layer_min_[e.layer];
  if (m.known && m.id == id) m.known = false;
}

const CacheIndex::LayerMin& CacheIndex::rescan(uint32_t layer) {
  LayerMin& m = layer_min_[layer];
  m.id.reset();
  for (uint32_t id : entries_.layer(layer)) {
    const Entry& e = *entries_.find(id);
    if (!e.evictable()) continue;
    const Key k = layer_key(id, e);
    if (!m.id || k < m.key || (k == m.key && id < *m.id)) {
      m.id = id;
      m.key = k;
    }
  }
  m.known = true;
  return m;
}

std::optional<uint32_t> CacheIndex::pick_victim(std::optional<double> below_activation) {
  // The smallest of the layers' smallest entries (see layer_key): O(layers) plus a rescan of the
  // layers that changed since their smallest was last known. Activation keys begin with the
  // priority, so when the smallest fails `below_activation` every entry does; lru and lfu keys do
  // not, and a prefetch under them scans every entry.
  const bool weighted = policy_ == EvictionPolicy::Activation;
  std::optional<uint32_t> best;
  Key best_key{};
  if (below_activation && !weighted) {
    for (const auto& [id, e] : entries_) {
      if (!e.evictable() || !(priority_of(id, e) < *below_activation)) continue;
      const Key k = layer_key(id, e);
      if (!best || k < best_key || (k == best_key && id < *best)) {
        best = id;
        best_key = k;
      }
    }
    return best;
  }
  for (uint32_t l = 0; l < num_layers_; ++l) {
    const LayerMin& m = layer_min(l);
    if (!m.id) continue;
    const Key k = weighted ? Key{m.key.first * distance_weight_[l], m.key.second} : m.key;
    if (!best || k < best_key || (k == best_key && *m.id < *best)) {
      best = m.id;
      best_key = k;
    }
  }
  if (best && below_activation && !(best_key.first < *below_activation)) return std::nullopt;
  return best;
}

void CacheIndex::evict(uint32_t id, std::vector<uint32_t>* evicted) {
  Entry& e = entry(id);
  forget(id, e);
  if (e.prefetched && !e.used) stats_.prefetch_unused += 1;
  arena_.free(e.offset);
  entries_.erase(id);
  stats_.evictions += 1;
  if (evicted) evicted->push_back(id);
}

uint64_t CacheIndex::place(uint32_t id, uint64_t bytes, bool prefetched, uint64_t offset) {
  Entry e{bytes, offset, id / experts_per_layer_};
  e.prefetched = prefetched;
  // A demand fetch is used at once; its access was counted already.
  e.used = !prefetched;
  e.last_use = ++clock_;
  e.uses = prefetched ? 0 : 1;
  entries_.emplace(id, e);
  stats_.bytes_loaded += bytes;
  stats_.peak_used = std::max(stats_.peak_used, arena_.used());
  if (prefetched) stats_.prefetches += 1;
  return offset;
}

uint64_t CacheIndex::insert_demand(uint32_t id, uint64_t bytes, std::vector<uint32_t>* evicted) {
  check_id(id);
  if (entries_.count(id)) throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " is cached already");
  if (Arena::slot_size(bytes) > arena_.capacity())
    throw Error(ErrorKind::Budget, "expert " + std::to_string(id) + " of " + std::to_string(bytes) +
                                       " bytes is larger than the cache budget");
  for (;;) {
    if (auto off = arena_.allocate(bytes)) return place(id, bytes, false, *off);
    auto victim = pick_victim(std::nullopt);
    if (!victim)
      throw Error(ErrorKind::CacheFull, "no room for expert " + std::to_string(id) + ": the " +
                                            std::to_string(entries_.size()) +
                                            " cached experts are all in use or in flight (raise the budget, or "
                                            "release experts before fetching more)");
    evict(*victim, evicted);
  }
}

std::optional<uint64_t> CacheIndex::insert_prefetch(uint32_t id, uint64_t bytes, double priority,
                                                    std::vector<uint32_t>* evicted) {
  check_id(id);
  if (entries_.count(id)) return std::nullopt;
  const uint64_t need = Arena::slot_size(bytes);
  if (need > arena_.capacity()) return std::nullopt;
  if (auto off = arena_.allocate(bytes)) return place(id, bytes, true, *off);
  // Evict only when the entries it may displace (ready, unpinned, of lower activation priority)
  // free enough bytes, so a refused prefetch changes nothing. The first victim alone usually does;
  // the scan stops once they do, and skips each layer whose smallest entry is not below `priority`.
  const std::optional<uint32_t> first = pick_victim(priority);
  if (!first) return std::nullopt;
  uint64_t reclaimable = arena_.capacity() - arena_.used() + Arena::slot_size(entry(*first).bytes);
  for (uint32_t l = 0; l < num_layers_ && reclaimable < need; ++l) {
    if (policy_ == EvictionPolicy::Activation) {  // the layer's smallest priority is its smallest key's
      const LayerMin& smallest = layer_min(l);
      if (!smallest.id || !(smallest.key.first * distance_weight_[l] < priority)) continue;
    }
    for (uint32_t other : entries_.layer(l)) {
      const Entry& e = *entries_.find(other);
      if (other != *first && e.evictable() && priority_of(other, e) < priority)
        reclaimable += Arena::slot_size(e.bytes);
      if (reclaimable >= need) break;
    }
  }
  if (reclaimable < need) return std::nullopt;
  std::vector<std::pair<uint32_t, Entry>> taken;
  const CacheStats stats = stats_;
  const size_t reported = evicted ? evicted->size() : 0;
  for (std::optional<uint32_t> victim = first; victim; victim = pick_victim(priority)) {
    taken.emplace_back(*victim, entry(*victim));
    evict(*victim, evicted);
    if (auto off = arena_.allocate(bytes)) return place(id, bytes, true, *off);
  }
  // Enough bytes in all but no contiguous range (fragmentation): the victims go back where they were,
  // so a refused prefetch changes nothing.
  for (auto it = taken.rbegin(); it != taken.rend(); ++it) {
    arena_.reserve(it->second.offset, it->second.bytes);
    entries_.emplace(it->first, it->second);
    touched(it->first, it->second);
  }
  stats_ = stats;
  if (evicted) evicted->resize(reported);
  return std::nullopt;
}

void CacheIndex::mark_ready(uint32_t id) {
  Entry& e = entry(id);
  e.loading = false;
  touched(id, e);
}

void CacheIndex::abort_loading(uint32_t id) {
  Entry& e = entry(id);
  if (!e.loading) throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " is not loading");
  forget(id, e);
  arena_.free(e.offset);
  entries_.erase(id);
}

void CacheIndex::pin(uint32_t id) {
  Entry& e = entry(id);
  e.pins += 1;
  touched(id, e);
}

void CacheIndex::unpin(uint32_t id) {
  Entry& e = entry(id);
  if (e.pins <= 0) throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " is not in use");
  e.pins -= 1;
  touched(id, e);
}

void CacheIndex::set_current_layer(uint32_t layer) {
  if (layer >= num_layers_)
    throw Error(ErrorKind::InvalidArgument, "layer " + std::to_string(layer) + " out of range (" +
                                                std::to_string(num_layers_) + " layers)");
  set_layer(layer);
}

void CacheIndex::set_activation(const float* a, size_t n) {
  if (n != activation_.size())
    throw Error(ErrorKind::Shape, "activation needs " + std::to_string(activation_.size()) + " values (layers x experts), got " +
                                      std::to_string(n));
  for (size_t i = 0; i < n; ++i)  // a NaN would make the victim order undefined
    if (!std::isfinite(a[i]))
      throw Error(ErrorKind::InvalidArgument, "activation holds a non-finite value at " + std::to_string(i) +
                                                  "; nothing was changed");
  // Only the layers whose row changed are reordered (a prediction usually changes the row of the
  // layer that just ran, unless its best matches changed).
  for (uint32_t l = 0; l < num_layers_; ++l) {
    float* row = activation_.data() + static_cast<size_t>(l) * experts_per_layer_;
    const float* in = a + static_cast<size_t>(l) * experts_per_layer_;
    if (std::equal(in, in + experts_per_layer_, row)) continue;
    std::copy(in, in + experts_per_layer_, row);
    if (policy_ == EvictionPolicy::Activation) layer_min_[l].known = false;
  }
}

bool CacheIndex::ready(uint32_t id) const {
  const Entry* e = entries_.find(id);
  return e && !e->loading;
}

bool CacheIndex::loading(uint32_t id) const {
  const Entry* e = entries_.find(id);
  return e && e->loading;
}

int CacheIndex::pins(uint32_t id) const {
  const Entry* e = entries_.find(id);
  return e ? e->pins : 0;
}

uint64_t CacheIndex::offset(uint32_t id) const { return entry(id).offset; }

std::vector<uint32_t> CacheIndex::resident() const {
  std::vector<uint32_t> ids;
  for (auto& [id, e] : entries_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::vector<uint32_t> CacheIndex::loading_ids() const {
  std::vector<uint32_t> ids;
  for (auto& [id, e] : entries_)
    if (e.loading) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

void CacheIndex::check_invariants() const {
  auto fail = [](const std::string& what) { throw Error(ErrorKind::InvalidArgument, "cache invariant broken: " + what); };
  if (arena_.used() > budget_) fail("used " + std::to_string(arena_.used()) + " > budget " + std::to_string(budget_));
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  uint64_t sum = 0;
  for (auto& [id, e] : entries_) {
    if (e.pins < 0) fail("negative pins on expert " + std::to_string(id));
    const uint64_t size = Arena::slot_size(e.bytes);
    if (e.offset + size > arena_.capacity()) fail("slot of expert " + std::to_string(id) + " beyond the budget");
    spans.emplace_back(e.offset, size);
    sum += size;
  }
  if (sum != arena_.used()) fail("slot bytes " + std::to_string(sum) + " != arena used " + std::to_string(arena_.used()));
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i - 1].first + spans[i - 1].second > spans[i].first) fail("overlapping slots");
}

}  // namespace moeoffload
