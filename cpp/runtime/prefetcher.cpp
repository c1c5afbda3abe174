#include "moeoffload/prefetcher.h"

#include <algorithm>
#include <numeric>

#include "moeoffload/errors.h"

namespace moeoffload {

std::vector<PrefetchItem> plan_prefetch(const float* prediction, uint32_t num_layers, uint32_t experts_per_layer,
                                        uint32_t current_layer, const PrefetchConfig& config) {
  if (current_layer >= num_layers)
    throw Error(ErrorKind::InvalidArgument, "layer " + std::to_string(current_layer) + " out of range");
  std::vector<PrefetchItem> plan;
  std::vector<uint32_t> order(experts_per_layer);
  for (uint32_t d = 1; d <= config.depth && d < num_layers; ++d) {
    const uint32_t layer = (current_layer + d) % num_layers;
    const float* row = prediction + static_cast<size_t>(layer) * experts_per_layer;
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return row[a] > row[b]; });
    for (uint32_t r = 0; r < std::min(config.per_layer, experts_per_layer); ++r) {
      const uint32_t e = order[r];
      if (row[e] <= 0.0f || row[e] < config.min_probability) break;
      plan.push_back({layer * experts_per_layer + e, row[e] * (1.0 - static_cast<double>(d) / num_layers)});
    }
  }
  std::stable_sort(plan.begin(), plan.end(), [](auto& a, auto& b) { return a.priority > b.priority; });
  return plan;
}

}  // namespace moeoffload
