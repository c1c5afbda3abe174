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
  Stored st;
  st.counts.assign(counts, counts + n);
  if (std::all_of(st.counts.begin(), st.counts.end(), [](uint32_t c) { return c == 0; })) return false;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& other : stored_)
    if (other.counts == st.counts) return false;
  st.normalised.assign(n, 0.0f);
  st.prefix_sq.assign(num_layers_ + 1, 0.0);
  for (uint32_t l = 0; l < num_layers_; ++l) {
    const uint32_t* row = counts + static_cast<size_t>(l) * experts_per_layer_;
    float* out = st.normalised.data() + static_cast<size_t>(l) * experts_per_layer_;
    const double sum = std::accumulate(row, row + experts_per_layer_, 0.0);
    double sq = 0.0;
    if (sum > 0)
      for (uint32_t e = 0; e < experts_per_layer_; ++e) {
        out[e] = static_cast<float>(row[e] / sum);
        sq += static_cast<double>(out[e]) * out[e];
      }
    st.prefix_sq[l + 1] = st.prefix_sq[l] + sq;
  }
  stored_.push_back(std::move(st));
  while (stored_.size() > capacity_) stored_.pop_front();
  version_ += 1;
  return true;
}

size_t ActivationHistory::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stored_.size();
}

std::vector<uint32_t> ActivationHistory::flat() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint32_t> out;
  for (auto& m : stored_) out.insert(out.end(), m.counts.begin(), m.counts.end());
  return out;
}

void ActivationHistory::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  stored_.clear();
  version_ += 1;
}

double ActivationHistory::normalise_row(const uint32_t* current, uint32_t layer, double* row) const {
  const uint32_t* c = current + static_cast<size_t>(layer) * experts_per_layer_;
  const double sum = std::accumulate(c, c + experts_per_layer_, 0.0);
  double sq = 0.0;
  for (uint32_t e = 0; e < experts_per_layer_; ++e) {
    row[e] = sum > 0 ? c[e] / sum : 0.0;
    sq += row[e] * row[e];
  }
  return sq;
}

double ActivationHistory::row_dot(const double* row, const Stored& s, uint32_t layer) const {
  const float* v = s.normalised.data() + static_cast<size_t>(layer) * experts_per_layer_;
  double dot = 0.0;
  for (uint32_t e = 0; e < experts_per_layer_; ++e) dot += row[e] * v[e];
  return dot;
}

// Cosine similarity of the current rows [0, layers_seen) with the same rows of
// each stored matrix; stored matrices are compared row-normalised so a long
// sequence does not outweigh a short one. Sums run row by row in order, the
// same in predict() and in ActivationMatcher, so both give the same bits.
std::vector<size_t> ActivationHistory::best_matches(const std::vector<double>& dots, const std::vector<double>& cur_sq,
                                                    uint32_t layers_seen, uint32_t top_matches) const {
  double cur_sq_sum = 0.0;
  for (uint32_t l = 0; l < layers_seen; ++l) cur_sq_sum += cur_sq[l];
  const double cur_norm = std::sqrt(cur_sq_sum);
  std::vector<std::pair<double, size_t>> sims;
  sims.reserve(stored_.size());
  for (size_t i = 0; i < stored_.size(); ++i) {
    double dot = 0.0;
    for (uint32_t l = 0; l < layers_seen; ++l) dot += dots[i * num_layers_ + l];
    const double nn = stored_[i].prefix_sq[layers_seen];
    const double sim = (cur_norm > 0 && nn > 0) ? dot / (cur_norm * std::sqrt(nn)) : 0.0;
    sims.emplace_back(sim, i);
  }
  size_t k = cur_norm > 0 ? std::min<size_t>(std::max<uint32_t>(top_matches, 1), sims.size()) : sims.size();
  std::partial_sort(sims.begin(), sims.begin() + k, sims.end(),
                    [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second > b.second); });
  std::vector<size_t> best(k);
  for (size_t r = 0; r < k; ++r) best[r] = sims[r].second;
  return best;
}

void ActivationHistory::average(const std::vector<size_t>& matches, float* out) const {
  const size_t n = static_cast<size_t>(num_layers_) * experts_per_layer_;
  if (matches.empty()) {
    std::fill(out, out + n, 1.0f / experts_per_layer_);
    return;
  }
  std::fill(out, out + n, 0.0f);
  for (size_t i : matches) {
    const float* s = stored_[i].normalised.data();
    for (size_t j = 0; j < n; ++j) out[j] += s[j];
  }
  const float k = static_cast<float>(matches.size());
  for (size_t j = 0; j < n; ++j) out[j] /= k;
}

void ActivationHistory::predict(const uint32_t* current, size_t n, uint32_t layers_seen, uint32_t top_matches,
                                float* out) const {
  check_size(n);
  if (layers_seen > num_layers_) layers_seen = num_layers_;
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<double> row(experts_per_layer_), cur_sq(num_layers_, 0.0);
  std::vector<double> dots(stored_.size() * num_layers_, 0.0);
  for (uint32_t l = 0; l < layers_seen; ++l) {
    cur_sq[l] = normalise_row(current, l, row.data());
    for (size_t i = 0; i < stored_.size(); ++i) dots[i * num_layers_ + l] = row_dot(row.data(), stored_[i], l);
  }
  average(best_matches(dots, cur_sq, layers_seen, top_matches), out);
}

ActivationMatcher::ActivationMatcher(const ActivationHistory& history) : history_(history) {
  const uint32_t L = history.num_layers();
  cur_.assign(static_cast<size_t>(L) * history.experts_per_layer(), 0.0);
  cur_sq_.assign(L, 0.0);
  stale_.assign(L, 1);
}

void ActivationMatcher::begin_sequence() {
  std::fill(cur_.begin(), cur_.end(), 0.0);
  std::fill(cur_sq_.begin(), cur_sq_.end(), 0.0);
  std::fill(stale_.begin(), stale_.end(), 1);
}

void ActivationMatcher::update(const uint32_t* counts, uint32_t layer) {
  const uint32_t E = history_.experts_per_layer();
  cur_sq_[layer] = history_.normalise_row(counts, layer, cur_.data() + static_cast<size_t>(layer) * E);
  stale_[layer] = 1;
}

const std::vector<float>& ActivationMatcher::predict(uint32_t layers_seen, uint32_t top_matches, bool* changed) {
  const uint32_t L = history_.num_layers(), E = history_.experts_per_layer();
  if (layers_seen > L) layers_seen = L;
  std::lock_guard<std::mutex> lock(history_.mu_);
  const size_t H = history_.stored_.size();
  if (history_.version_ != version_ || dots_.size() != H * L) {
    dots_.assign(H * L, 0.0);
    std::fill(stale_.begin(), stale_.end(), 1);
    version_ = history_.version_;
    averaged_ = false;  // the same indices may name other matrices now
  }
  for (uint32_t l = 0; l < layers_seen; ++l) {
    if (!stale_[l]) continue;
    const double* row = cur_.data() + static_cast<size_t>(l) * E;
    for (size_t i = 0; i < H; ++i) dots_[i * L + l] = history_.row_dot(row, history_.stored_[i], l);
    stale_[l] = 0;
  }
  std::vector<size_t> matches = history_.best_matches(dots_, cur_sq_, layers_seen, top_matches);
  const bool same = averaged_ && matches == matches_;
  if (!same) {
    average_.resize(static_cast<size_t>(L) * E);
    history_.average(matches, average_.data());
    matches_ = std::move(matches);
    averaged_ = true;
  }
  if (changed) *changed = !same;
  return average_;
}

}  // namespace moeoffload
