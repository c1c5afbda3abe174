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
  friend class ActivationMatcher;
  struct Stored {
    std::vector<uint32_t> counts;
    std::vector<float> normalised;  // rows sum to 1 (zero rows stay 0)
    std::vector<double> prefix_sq;  // [layers + 1]: sum of squared normalised values of the rows before
  };
  void check_size(size_t n) const;
  // Row l of `current` normalised into `row` (double); returns its sum of squares.
  double normalise_row(const uint32_t* current, uint32_t layer, double* row) const;
  double row_dot(const double* row, const Stored& s, uint32_t layer) const;
  // The best matches by cosine similarity from per-row dot products (dots[i * layers + l]), best
  // first; every stored matrix when the current rows hold no counts. Empty when the history is.
  std::vector<size_t> best_matches(const std::vector<double>& dots, const std::vector<double>& cur_sq,
                                   uint32_t layers_seen, uint32_t top_matches) const;
  // Those matrices averaged into out (uniform when there are none).
  void average(const std::vector<size_t>& matches, float* out) const;
  uint32_t num_layers_, experts_per_layer_;
  size_t capacity_;
  mutable std::mutex mu_;
  std::deque<Stored> stored_;
  uint64_t version_ = 0;  // bumped by every change of stored_
};

// ActivationHistory::predict for one sequence as it grows, giving the same
// values bit for bit: it keeps each stored matrix's dot product with each of
// the sequence's normalised rows, so a step that changes one layer costs
// O(history x experts), not O(history x layers x experts), and it averages the
// matches again only when they change. Recomputes the dots when the history
// changes. One sequence, one thread.
class ActivationMatcher {
 public:
  explicit ActivationMatcher(const ActivationHistory& history);
  void begin_sequence();
  // Layer `layer` of the sequence's counts (`counts`: the whole layers x experts matrix) changed.
  void update(const uint32_t* counts, uint32_t layer);
  // The prediction ([layers * experts], valid until the next call); *changed: whether it differs
  // from the one the previous call returned (false only when the same matches were averaged).
  const std::vector<float>& predict(uint32_t layers_seen, uint32_t top_matches, bool* changed = nullptr);

 private:
  const ActivationHistory& history_;
  std::vector<double> cur_;     // [layers * experts], rows normalised
  std::vector<double> cur_sq_;  // [layers]
  std::vector<uint8_t> stale_;  // [layers]: dots of this row need recomputing
  std::vector<double> dots_;    // [stored * layers]
  uint64_t version_ = ~0ull;
  std::vector<size_t> matches_;  // what average_ holds
  bool averaged_ = false;
  std::vector<float> average_;   // [layers * experts]
};

}  // namespace moeoffload
