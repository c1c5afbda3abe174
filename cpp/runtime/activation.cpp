#include "moeoffload/activation.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moeoffload/errors.h"

namespace moeoffload {

ActivationTracer::ActivationTracer(uint32_t num_layers, uint32_t experts_per_layer)
    : num_layers_(num_layers), experts_per_layer_(experts_per_layer) {
  if (num_layers == 0 || experts_per_layer == 0)
    throw Error(ErrorKind::InvalidArgument, "an activation matrix needs at least one layer and one expert");
  counts_.assign(static_cast<size_t>(num_layers) * experts_per_layer, 0);
}

void ActivationTracer::begin_sequence() {
  std::fill(counts_.begin(), counts_.end(), 0u);
  layers_seen_ = 0;
}

void ActivationTracer::record(uint32_t layer, const uint32_t* experts, size_t n) {
  if (layer >= num_layers_)
    throw Error(ErrorKind::InvalidArgument, "layer " + std::to_string(layer) + " out of range");
  for (size_t i = 0; i < n; ++i)
    if (experts[i] >= experts_per_layer_)
      throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(experts[i]) + " out of range");
  for (size_t i = 0; i < n; ++i) counts_[static_cast<size_t>(layer) * experts_per_layer_ + experts[i]] += 1;
  layers_seen_ = std::max(layers_seen_, layer + 1);
}

ActivationHistory::ActivationHistory(uint32_t num_layers, uint32_t experts_per_layer, size_t capacity)
    : num_layers_(num_layers), experts_per_layer_(experts_per_layer), capacity_(capacity) {
  if (num_layers == 0 || experts_per_layer == 0 || capacity == 0)
    throw Error(ErrorKind::InvalidArgument, "ActivationHistory needs layers, experts and a capacity above zero");
}

void ActivationHistory::check_size(size_t n) const {
  if (n != static_cast<size_t>(num_layers_) * experts_per_layer_)
    throw Error(ErrorKind::Shape, "an activation matrix here has " + std::to_string(num_layers_) + " x " +
                                      std::to_string(experts_per_layer_) + " entries, got " + std::to_string(n));
}

bool ActivationHistory::add(const uint32_t* counts, size_t n) {
  check_size(n);
  std::vector<uint32_t> m(counts, counts + n);
  if (std::all_of(m.begin(), m.end(), [](uint32_t c) { return c == 0; })) return false;
  std::lock_guard<std::mutex> lock(mu_);
  if (std::find(counts_.begin(), counts_.end(), m) != counts_.end()) return false;
  std::vector<float> norm(n, 0.0f);
  for (uint32_t l = 0; l < num_layers_; ++l) {
    const uint32_t* row = counts + static_cast<size_t>(l) * experts_per_layer_;
    const double sum = std::accumulate(row, row + experts_per_layer_, 0.0);
    if (sum > 0)
      for (uint32_t e = 0; e < experts_per_layer_; ++e)
        norm[static_cast<size_t>(l) * experts_per_layer_ + e] = static_cast<float>(row[e] / sum);
  }
  counts_.push_back(std::move(m));
  normalised_.push_back(std::move(norm));
  while (counts_.size() > capacity_) {
    counts_.pop_front();
    normalised_.pop_front();
  }
  return true;
}

size_t ActivationHistory::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counts_.size();
}

std::vector<uint32_t> ActivationHistory::flat() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint32_t> out;
  for (auto& m : counts_) out.insert(out.end(), m.begin(), m.end());
  return out;
}

void ActivationHistory::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  counts_.clear();
  normalised_.clear();
}

void ActivationHistory::predict(const uint32_t* current, size_t n, uint32_t layers_seen, uint32_t top_matches,
                                float* out) const {
  check_size(n);
  if (layers_seen > num_layers_) layers_seen = num_layers_;
  std::lock_guard<std::mutex> lock(mu_);
  std::fill(out, out + n, 0.0f);
  if (counts_.empty()) {
    std::fill(out, out + n, 1.0f / experts_per_layer_);
    return;
  }
  // Cosine similarity of the current rows [0, layers_seen) with the same rows
  // of each stored matrix; stored matrices are compared row-normalised so a
  // long sequence does not outweigh a short one.
  const size_t m = static_cast<size_t>(layers_seen) * experts_per_layer_;
  std::vector<double> cur(m);
  for (uint32_t l = 0; l < layers_seen; ++l) {
    const uint32_t* row = current + static_cast<size_t>(l) * experts_per_layer_;
    const double sum = std::accumulate(row, row + experts_per_layer_, 0.0);
    for (uint32_t e = 0; e < experts_per_layer_; ++e)
      cur[static_cast<size_t>(l) * experts_per_layer_ + e] = sum > 0 ? row[e] / sum : 0.0;
  }
  const double cur_norm = std::sqrt(std::inner_product(cur.begin(), cur.end(), cur.begin(), 0.0));
  std::vector<std::pair<double, size_t>> sims;
  sims.reserve(normalised_.size());
  for (size_t i = 0; i < normalised_.size(); ++i) {
    const auto& s = normalised_[i];
    double dot = 0, nn = 0;
    for (size_t j = 0; j < m; ++j) {
      dot += cur[j] * s[j];
      nn += static_cast<double>(s[j]) * s[j];
    }
    const double sim = (cur_norm > 0 && nn > 0) ? dot / (cur_norm * std::sqrt(nn)) : 0.0;
    sims.emplace_back(sim, i);
  }
  size_t k = cur_norm > 0 ? std::min<size_t>(std::max<uint32_t>(top_matches, 1), sims.size()) : sims.size();
  std::partial_sort(sims.begin(), sims.begin() + k, sims.end(),
                    [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second > b.second); });
  for (size_t r = 0; r < k; ++r) {
    const auto& s = normalised_[sims[r].second];
    for (size_t j = 0; j < n; ++j) out[j] += s[j] / static_cast<float>(k);
  }
}

}  // namespace moeoffload
