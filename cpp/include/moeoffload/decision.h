// The per-layer decision step, one native call shared by the live path
// (ExpertCache.record, through DeviceCache::apply) and the simulator
// (moeoffload.sim): after a layer's router has chosen its experts,
//
//   record  the choices (the sequence's activation matrix, and its own counts
//           decayed by `recency` per later token at that layer);
//   predict the [layers x experts] activation: the best matches of the history
//           (ActivationHistory::predict) blended with the sequence's own rows,
//           weight `self_weight`;
//   source  the matrix the prefetch plan is made from: the prediction
//           ("activation"), the next layer's router probabilities on the
//           current hidden state ("hidden"), or both averaged on the next
//           layer ("combined");
//   plan    plan_prefetch on that source.
//
// The prediction is computed only when something uses it: the activation
// eviction policy, or an "activation"/"combined" source. Not thread-safe itself:
// callers that may step it from several threads hold mutex() (below).
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "moeoffload/activation.h"
#include "moeoffload/cache_index.h"
#include "moeoffload/fork.h"
#include "moeoffload/prefetcher.h"

namespace moeoffload {

enum class PrefetchSource { None, Activation, Hidden, Combined };

PrefetchSource parse_prefetch_source(const std::string& name);  // "none", "activation", "hidden", "combined"

struct DecisionConfig {
  PrefetchSource source = PrefetchSource::Activation;
  bool activation_priorities = true;  // the cache evicts by activation: it needs the prediction every step
  PrefetchConfig plan;
  uint32_t top_matches = 4;
  double recency = 1.0;      // (0, 1]
  double self_weight = 1.0;  // >= 0; 0: the history's matches alone
};

struct Decision {
  uint32_t layer = 0;
  const float* activation = nullptr;  // [layers * experts], or null when not predicted this step
  size_t activation_size = 0;
  std::vector<PrefetchItem> plan;     // best first
};

class DecisionStep {
 public:
  DecisionStep(uint32_t num_layers, uint32_t experts_per_layer, std::shared_ptr<ActivationHistory> history,
               const DecisionConfig& config);
  void begin_sequence();
  // Hands the sequence's matrix to the history; false when it kept nothing (empty or a duplicate).
  bool end_sequence();
  // `hidden_next`: layer+1's router probabilities on the current hidden state (`experts_per_layer`
  // finite values, or hidden_n = 0 when the caller has none this step: "hidden" then plans nothing,
  // "combined" plans from the activation alone), required by the "hidden" and "combined" sources
  // (a null pointer is refused), ignored otherwise. The returned decision stays valid until the next call.
  const Decision& step(uint32_t layer, const uint32_t* experts, size_t n, const float* hidden_next, size_t hidden_n);

  const Decision& last() const { return decision_; }
  // One decode sequence's state, not thread-safe itself: callers that may step it from several
  // threads (the bindings release the GIL for a step and its prefetches) hold this lock across a
  // step and every use of its decision, begin_sequence, end_sequence and the reads of tracer() and
  // last(). Concurrent records then interleave whole, in some order. fork() takes it first
  // (HeldAcrossFork rank -1: a step applies its plan through the cache, rank 0).
  std::mutex& mutex() const { return mu_; }
  bool needs_hidden() const { return config_.source == PrefetchSource::Hidden || config_.source == PrefetchSource::Combined; }
  bool predicts() const;
  const DecisionConfig& config() const { return config_; }
  const ActivationTracer& tracer() const { return tracer_; }
  const std::shared_ptr<ActivationHistory>& history() const { return history_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t experts_per_layer() const { return experts_per_layer_; }

 private:
  void predict(uint32_t layer);  // into prediction_, after row `layer` of the sequence changed
  uint32_t num_layers_, experts_per_layer_;
  std::shared_ptr<ActivationHistory> history_;
  DecisionConfig config_;
  ActivationTracer tracer_;
  ActivationMatcher matcher_;
  std::vector<float> own_;         // the sequence's decayed counts
  std::vector<float> prediction_;  // [layers * experts]
  bool blend_all_ = true;          // every row of prediction_ is to be made again
  std::vector<float> source_;      // the plan's input when it differs from the prediction
  Decision decision_;
  mutable std::mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, -1};
};

// The cache's side of a decision: the layer now running, and the activation
// priorities when the decision carries them (the sim's CacheIndex; DeviceCache::apply
// does the same under its lock and then starts the plan's prefetches).
void apply_priorities(const Decision& decision, CacheIndex& index);

}  // namespace moeoffload
