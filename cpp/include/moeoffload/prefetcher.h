// Which experts to fetch ahead, in what order. From a prediction
// (layers x experts probabilities) and the layer about to run, the plan holds
// the most likely experts of each of the next `depth` layers, at most
// `per_layer` of them with probability >= `min_probability`, ordered by the
// activation priority p * (1 - d / L) the cache uses (d = layers ahead).
#pragma once
#include <cstdint>
#include <vector>

namespace moeoffload {

struct PrefetchItem {
  uint32_t id;
  double priority;
};

struct PrefetchConfig {
  uint32_t depth = 2;
  uint32_t per_layer = 3;
  double min_probability = 0.05;
};

std::vector<PrefetchItem> plan_prefetch(const float* prediction, uint32_t num_layers, uint32_t experts_per_layer,
                                        uint32_t current_layer, const PrefetchConfig& config);

}  // namespace moeoffload
