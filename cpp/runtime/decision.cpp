#include "moeoffload/decision.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "moeoffload/errors.h"

namespace moeoffload {

PrefetchSource parse_prefetch_source(const std::string& name) {
  if (name == "none") return PrefetchSource::None;
  if (name == "activation") return PrefetchSource::Activation;
  if (name == "hidden") return PrefetchSource::Hidden;
  if (name == "combined") return PrefetchSource::Combined;
  throw Error(ErrorKind::InvalidArgument,
              "prefetch source must be 'none', 'activation', 'hidden' or 'combined', got '" + name + "'");
}

namespace {

const ActivationHistory& checked(std::shared_ptr<ActivationHistory>& history, uint32_t num_layers,
                                 uint32_t experts_per_layer) {
  if (!history) history = std::make_shared<ActivationHistory>(num_layers, experts_per_layer, 512);
  if (history->num_layers() != num_layers || history->experts_per_layer() != experts_per_layer)
    throw Error(ErrorKind::Shape, "the activation history is " + std::to_string(history->num_layers()) + " x " +
                                      std::to_string(history->experts_per_layer()) + ", the decision step " +
                                      std::to_string(num_layers) + " x " + std::to_string(experts_per_layer));
  return *history;
}

}  // namespace

DecisionStep::DecisionStep(uint32_t num_layers, uint32_t experts_per_layer, std::shared_ptr<ActivationHistory> history,
                           const DecisionConfig& config)
    : num_layers_(num_layers), experts_per_layer_(experts_per_layer), history_(std::move(history)), config_(config),
      tracer_(num_layers, experts_per_layer), matcher_(checked(history_, num_layers, experts_per_layer)) {
  if (!(config.recency > 0.0 && config.recency <= 1.0))
    throw Error(ErrorKind::InvalidArgument, "recency must be in (0, 1], got " + std::to_string(config.recency));
  if (!(config.self_weight >= 0.0) || !std::isfinite(config.self_weight))
    throw Error(ErrorKind::InvalidArgument, "self_weight must be a finite value >= 0");
  if (config.top_matches < 1 || config.plan.depth < 1 || config.plan.per_layer < 1)
    throw Error(ErrorKind::InvalidArgument, "prefetch depth, per_layer and top_matches must be >= 1");
  const size_t n = static_cast<size_t>(num_layers) * experts_per_layer;
  own_.assign(n, 0.0f);
  prediction_.assign(n, 0.0f);
}

bool DecisionStep::predicts() const {
  return config_.activation_priorities || config_.source == PrefetchSource::Activation ||
         config_.source == PrefetchSource::Combined;
}

void DecisionStep::begin_sequence() {
  tracer_.begin_sequence();
  matcher_.begin_sequence();
  std::fill(own_.begin(), own_.end(), 0.0f);
  blend_all_ = true;
}

bool DecisionStep::end_sequence() {
  const auto& m = tracer_.matrix();
  return history_->add(m.data(), m.size());
}

void DecisionStep::predict(uint32_t layer) {
  bool matches_changed = true;
  const std::vector<float>& matched = matcher_.predict(tracer_.layers_seen(), config_.top_matches, &matches_changed);
  // The sequence's own rows so far are one more match, weighted self_weight. Only row `layer` of them
  // changed this step, so only it is blended again unless the matches changed (or a sequence began).
  const bool all = matches_changed || blend_all_;
  blend_all_ = false;
  const uint32_t first = all ? 0 : layer, last = all ? num_layers_ : layer + 1;
  const float w = static_cast<float>(config_.self_weight);
  for (uint32_t l = first; l < last; ++l) {
    const size_t at = static_cast<size_t>(l) * experts_per_layer_;
    const float* own = own_.data() + at;
    float* out = prediction_.data() + at;
    std::copy(matched.begin() + at, matched.begin() + at + experts_per_layer_, out);
    if (config_.self_weight <= 0.0) continue;
    float sum = 0.0f;
    for (uint32_t e = 0; e < experts_per_layer_; ++e) sum += own[e];
    if (sum <= 0.0f) continue;
    for (uint32_t e = 0; e < experts_per_layer_; ++e) out[e] = (out[e] + w * (own[e] / sum)) / (1.0f + w);
  }
}

const Decision& DecisionStep::step(uint32_t layer, const uint32_t* experts, size_t n, const float* hidden_next,
                                   size_t hidden_n) {
  if (layer >= num_layers_)
    throw Error(ErrorKind::InvalidArgument, "layer " + std::to_string(layer) + " out of range (" +
                                                std::to_string(num_layers_) + " layers)");
  if (needs_hidden()) {
    if (hidden_next == nullptr)
      throw Error(ErrorKind::InvalidArgument,
                  "prefetch source 'hidden' or 'combined' needs the next layer's router probabilities (hidden_next)");
    if (hidden_n != 0 && hidden_n != experts_per_layer_)  // 0: no prediction this step
      throw Error(ErrorKind::Shape, "the next layer's router probabilities need " + std::to_string(experts_per_layer_) +
                                        " values (or none), got " + std::to_string(hidden_n));
    for (size_t i = 0; i < hidden_n; ++i)
      if (!std::isfinite(hidden_next[i]))
        throw Error(ErrorKind::InvalidArgument, "the next layer's router probabilities hold a non-finite value");
  }
  tracer_.record(layer, experts, n);  // checks the ids before anything changes
  matcher_.update(tracer_.matrix().data(), layer);
  float* own = own_.data() + static_cast<size_t>(layer) * experts_per_layer_;
  if (config_.recency != 1.0)
    for (uint32_t e = 0; e < experts_per_layer_; ++e) own[e] *= static_cast<float>(config_.recency);
  for (size_t i = 0; i < n; ++i) own[experts[i]] += 1.0f;

  decision_.layer = layer;
  decision_.plan.clear();
  decision_.activation = nullptr;
  decision_.activation_size = 0;
  if (predicts()) {
    predict(layer);
    decision_.activation = prediction_.data();
    decision_.activation_size = prediction_.size();
  }
  if (config_.source == PrefetchSource::None) return decision_;
  const float* source = prediction_.data();
  if (needs_hidden()) {
    const uint32_t next = (layer + 1) % num_layers_;
    if (config_.source == PrefetchSource::Hidden) {  // nothing to plan from without a prediction
      source_.assign(prediction_.size(), 0.0f);
      std::copy(hidden_next, hidden_next + hidden_n, source_.begin() + static_cast<size_t>(next) * experts_per_layer_);
    } else if (hidden_n == 0) {  // combined without a prediction: the activation's alone
      source_ = prediction_;
    } else {
      source_ = prediction_;
      float* row = source_.data() + static_cast<size_t>(next) * experts_per_layer_;
      for (uint32_t e = 0; e < experts_per_layer_; ++e) row[e] = 0.5f * (row[e] + hidden_next[e]);
    }
    source = source_.data();
  }
  decision_.plan = plan_prefetch(source, num_layers_, experts_per_layer_, layer, config_.plan);
  return decision_;
}

void apply_priorities(const Decision& decision, CacheIndex& index) {
  index.set_current_layer(decision.layer);
  if (decision.activation) index.set_activation(decision.activation, decision.activation_size);
}

}  // namespace moeoffload
