// google-benchmark microbenchmarks of the szp CPU codec on weight-like data
// (Gaussian, eb = 0.05 std), reported as bytes/s of the stored dtype, and of
// szpe's CPU decoders (eb = 0.2 and 1.0 std): to values, and the transcode to
// szp that a fixed-width cache runs on arrival (bytes/s of bf16 it stands for).
// MOEOFFLOAD_ISA=portable|avx2 runs the slower paths (cpu_isa.h).
//   cmake -S . -B build/bench -DMOEOFFLOAD_BENCH=ON && cmake --build build/bench && build/bench/szp_bench
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "moeoffload/szp.h"
#include "moeoffload/szpe.h"

using namespace moeoffload;

namespace {

std::vector<uint16_t> bf16_weights(uint64_t n) {
  std::mt19937 gen(42);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<uint16_t> w(n);
  for (auto& v : w) v = f32_to_bf16(dist(gen));
  return w;
}

std::vector<float> f32_weights(uint64_t n) {
  std::mt19937 gen(42);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> w(n);
  for (auto& v : w) v = dist(gen);
  return w;
}

template <typename T>
const void* data_of(const std::vector<T>& v) {
  return v.data();
}

void BM_encode(benchmark::State& state, DType t) {
  const uint64_t rows = state.range(0), cols = 4096, n = rows * cols;
  auto w16 = bf16_weights(t == DType::F32 ? 0 : n);
  auto w32 = f32_weights(t == DType::F32 ? n : 0);
  const void* data = t == DType::F32 ? data_of(w32) : data_of(w16);
  for (auto _ : state) benchmark::DoNotOptimize(szp_encode(data, t, {rows, cols}, 0.05 * 0.02));
  state.SetBytesProcessed(state.iterations() * n * dtype_size(t));
}

void BM_decode(benchmark::State& state, DType t) {
  const uint64_t rows = state.range(0), cols = 4096, n = rows * cols;
  auto w16 = bf16_weights(t == DType::F32 ? 0 : n);
  auto w32 = f32_weights(t == DType::F32 ? n : 0);
  const void* data = t == DType::F32 ? data_of(w32) : data_of(w16);
  SzpEncodeResult enc = szp_encode(data, t, {rows, cols}, 0.05 * 0.02);
  SzpView view = szp_parse(enc.bytes.data(), enc.bytes.size(), true);
  std::vector<uint8_t> out(n * dtype_size(t));
  for (auto _ : state) {
    szp_decode_cpu(enc.bytes.data(), view, out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * dtype_size(t));
  state.counters["bits_per_value"] = 8.0 * enc.bytes.size() / n;
}

// An szpe buffer of n_rows x 4096 bf16 weights at eb = state.range(1) / 10 std.
std::vector<uint8_t> szpe_of(const benchmark::State& state) {
  const uint64_t rows = state.range(0), cols = 4096;
  auto w = bf16_weights(rows * cols);
  SzpEncodeResult enc = szp_encode(w.data(), DType::BF16, {rows, cols}, state.range(1) / 10.0 * 0.02);
  return szpe_from_szp(enc.bytes.data(), szp_parse(enc.bytes.data(), enc.bytes.size(), true));
}

// szpe's CPU decoder to values, or (to_szp) its transcode back to the szp buffer.
void BM_szpe(benchmark::State& state, bool to_szp) {
  const std::vector<uint8_t> buf = szpe_of(state);
  const SzpeView e = szpe_parse(buf.data(), buf.size(), true);
  std::vector<uint8_t> out(to_szp ? e.as_szp.total_bytes : 2 * e.szp.numel);
  for (auto _ : state) {
    if (to_szp) szpe_to_szp_into(buf.data(), e, out.data());
    else szpe_decode_cpu(buf.data(), e, out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * e.szp.numel * 2);
  state.counters["bits_per_value"] = 8.0 * buf.size() / e.szp.numel;
}

}  // namespace

BENCHMARK_CAPTURE(BM_szpe, decode, false)->Args({1024, 2})->Args({1024, 10})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_szpe, to_szp, true)->Args({1024, 2})->Args({1024, 10})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_encode, bf16, DType::BF16)->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_decode, bf16, DType::BF16)->Arg(256)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_decode, f32, DType::F32)->Arg(256)->Arg(4096)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
