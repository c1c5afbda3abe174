// Sequence-level expert activation matrices (MoE-Infinity): for one sequence,
// how many tokens chose each expert of each layer (layers x experts counts).
//
// ActivationTracer accumulates the matrix of the sequence being served and
// hands it to an ActivationHistory when the sequence ends. The history is a
// bounded collection (oldest dropped first, exact duplicates kept once).
// predict() matches the current partial matrix against the collection by
// cosine similarity over the layers seen so far and averages the row-normalised
// matrices of the best matches: the predicted probability that each expert of
// each layer is chosen.
#pragma once
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

namespace moeoffload {

class ActivationTracer {
 public:
  ActivationTracer(uint32_t num_layers, uint32_t experts_per_layer);
  void begin_sequence();
  // Adds one count to each listed expert of `layer` (the top-k of one token,
  // or of all tokens of a prefill chunk).
  void record(uint32_t layer, const uint32_t* experts, size_t n);
  const std::vector<uint32_t>& matrix() const { return counts_; }
  uint32_t layers_seen() const { return layers_seen_; }  // rows with any count yet
  uint32_t num_layers() const { return num_layers_; }
  uint32_t experts_per_layer() const { return experts_per_layer_; }

 private:
  uint32_t num_layers_, experts_per_layer_;
  std::vector<uint32_t> counts_;
  uint32_t layers_seen_ = 0;
};

class ActivationHistory {
 public:
  ActivationHistory(uint32_t num_layers, uint32_t experts_per_layer, size_t capacity);
  // Returns false when an identical matrix is kept already (or it is all zero).
  bool add(const uint32_t* counts, size_t n);
  size_t size() const;
  size_t capacity() const { return capacity_; }
  uint32_t num_layers() const { return num_layers_; }
  uint32_t experts_per_layer() const { return experts_per_layer_; }
  std::vector<uint32_t> flat() const;  // [size, layers, experts]
  void clear();
  // Writes layers x experts probabilities into `out`. `layers_seen` rows of
  // `current` are compared (all rows when it equals the layer count);
  // `top_matches` best matches are averaged. An empty history, or a current
  // matrix with no counts, predicts from every stored matrix.
  void predict(const uint32_t* current, size_t n, uint32_t layers_seen, uint32_t top_matches, float* out) const;

 private:
  void check_size(size_t n) const;
  uint32_t num_layers_, experts_per_layer_;
  size_t capacity_;
  mutable std::mutex mu_;
  std::deque<std::vector<uint32_t>> counts_;
  std::deque<std::vector<float>> normalised_;  // rows sum to 1 (zero rows stay 0)
};

}  // namespace moeoffload
