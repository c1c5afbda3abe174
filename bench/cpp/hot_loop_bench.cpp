// google-benchmark of one decode step's hot loop, without a model:
//   BM_decision_step  the per-layer decision (record -> predict -> plan) on a
//                     Qwen3-30B-A3B-shaped table (48 layers x 128 experts,
//                     top-8) with a 64-sequence history, plus the CacheIndex
//                     accesses, pins and prefetch inserts of that layer;
//   BM_expert_mlp     the fused CPU expert call for one expert at T = 1
//                     (Qwen3-30B-A3B expert: hidden 2048, intermediate 768,
//                     bf16, eb = 0.3 std), and its dense bf16 counterpart is
//                     bench/fused.py's;
//   BM_moe_experts_step one decode step's moe_experts (8 routed experts, T = 1)
//                     on tiny matrices (hidden 64, intermediate 32), where the
//                     math is nothing and what is timed is the call's own
//                     overhead: grouping, scratch, dispatch (it caught a
//                     /sys read at every matrix, 7 µs each).
// A regression in either shows here. Run:
//   cmake -S . -B build/bench -DMOEOFFLOAD_BENCH=ON && cmake --build build/bench && build/bench/hot_loop_bench
#include <benchmark/benchmark.h>

#include <memory>
#include <random>
#include <vector>

#include "moeoffload/cache_index.h"
#include "moeoffload/cpu_kernels.h"
#include "moeoffload/decision.h"
#include "moeoffload/moe_experts.h"
#include "moeoffload/szp.h"

using namespace moeoffload;

namespace {

constexpr uint32_t kLayers = 48, kExperts = 128, kTopK = 8;
constexpr uint64_t kExpertBytes = 1'600'000;  // about a szp Qwen3-30B-A3B expert at 3.4 bits/weight

void BM_decision_step(benchmark::State& state) {
  const auto source = static_cast<PrefetchSource>(state.range(0));
  std::mt19937 gen(7);
  auto history = std::make_shared<ActivationHistory>(kLayers, kExperts, 64);  // full: steady state
  std::vector<uint32_t> counts(static_cast<size_t>(kLayers) * kExperts);
  for (int s = 0; s < 64; ++s) {
    for (auto& c : counts) c = gen() % 4;
    history->add(counts.data(), counts.size());
  }
  DecisionConfig cfg;
  cfg.source = source;
  cfg.plan = {1, 2 * kTopK, 0.02};
  DecisionStep step(kLayers, kExperts, history, cfg);
  CacheIndex index(kExpertBytes * kLayers * kExperts / 4, EvictionPolicy::Activation, kLayers, kExperts,
                   kExpertBytes);
  std::vector<float> hidden(kExperts, 1.0f / kExperts);
  std::vector<uint32_t> routed(kTopK);
  uint32_t layer = 0;
  step.begin_sequence();
  for (auto _ : state) {
    for (auto& e : routed) e = gen() % kExperts;
    for (uint32_t e : routed) {
      const uint32_t id = layer * kExperts + e;
      if (index.access(id) == Lookup::Miss) {
        index.insert_demand(id, kExpertBytes);
        index.mark_ready(id);
      }
      index.pin(id);
    }
    const Decision& d = step.step(layer, routed.data(), routed.size(), hidden.data(), hidden.size());
    apply_priorities(d, index);
    for (const auto& item : d.plan)
      if (index.insert_prefetch(item.id, kExpertBytes, item.priority)) index.mark_ready(item.id);
    for (uint32_t e : routed)
      if (index.pins(layer * kExperts + e) > 0) index.unpin(layer * kExperts + e);
    layer = (layer + 1) % kLayers;
    if (layer == 0) {
      step.end_sequence();
      step.begin_sequence();
    }
  }
  state.counters["layers/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_decision_step)->Arg(static_cast<int>(PrefetchSource::Activation))->ArgName("activation");
BENCHMARK(BM_decision_step)->Arg(static_cast<int>(PrefetchSource::Hidden))->ArgName("hidden");

std::vector<uint8_t> encoded(uint64_t rows, uint64_t cols, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<uint16_t> w(rows * cols);
  for (auto& v : w) v = f32_to_bf16(dist(gen));
  return szp_encode(w.data(), DType::BF16, {rows, cols}, 0.3 * 0.02).bytes;
}

SzpMatrix matrix_of(const std::vector<uint8_t>& bytes) {
  return szp_matrix(bytes.data(), szp_parse(bytes.data(), bytes.size(), true));
}

void BM_expert_mlp(benchmark::State& state) {
  const uint64_t hidden = 2048, inter = 768;
  const uint32_t tokens = static_cast<uint32_t>(state.range(0));
  std::mt19937 gen(11);
  auto gate_up_bytes = encoded(2 * inter, hidden, gen);
  auto down_bytes = encoded(hidden, inter, gen);
  const SzpMatrix gate_up = matrix_of(gate_up_bytes), down = matrix_of(down_bytes);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint16_t> x(tokens * hidden), y(tokens * hidden);
  for (auto& v : x) v = f32_to_bf16(dist(gen));
  for (auto _ : state) {
    expert_mlp_cpu(gate_up, down, x.data(), DType::BF16, tokens, MlpConfig{}, nullptr, nullptr, y.data());
    benchmark::ClobberMemory();
  }
  state.counters["weight_bytes/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * 3 * hidden * inter * 2, benchmark::Counter::kIsRate);
  state.counters["bits_per_weight"] = 8.0 * (gate_up_bytes.size() + down_bytes.size()) / (3.0 * hidden * inter);
}
BENCHMARK(BM_expert_mlp)->Arg(1)->Arg(4)->ArgName("tokens")->Unit(benchmark::kMicrosecond);

void BM_moe_experts_step(benchmark::State& state) {
  const uint64_t hidden = 64, inter = 32;
  std::mt19937 gen(13);
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<ExpertMatrices> experts(kTopK);
  for (auto& e : experts) {
    bytes.push_back(encoded(2 * inter, hidden, gen));
    e.gate_up = matrix_of(bytes.back());
    bytes.push_back(encoded(hidden, inter, gen));
    e.down = matrix_of(bytes.back());
  }
  std::vector<int64_t> index(kTopK);
  for (uint32_t j = 0; j < kTopK; ++j) index[j] = 16 * j + 3;  // 8 of 128, one token
  std::vector<float> weights(kTopK, 0.125f);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint16_t> x(hidden), y(hidden);
  for (auto& v : x) v = f32_to_bf16(dist(gen));
  for (auto _ : state) {
    const Routing routing = group_routing(index.data(), 1, kTopK, kExperts);
    moe_experts_cpu(routing, experts, weights.data(), 1, kTopK, hidden, x.data(), DType::BF16, MlpConfig{}, y.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_moe_experts_step)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
