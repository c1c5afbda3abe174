// The decode kernels of cuda/szp_decode.cuh and cuda/szpe_decode.cuh on the CPU emulator
// (cuda_emulator.h), launched as the .cu files launch them:
//   decoders_emulated MODE IN OUT [MODE IN OUT ...]
// MODE szpe-to-szp (an szpe buffer to the szp buffer it transcodes to), szpe-values (an szpe buffer
// to its values) or szp-values (an szp buffer to its values). Each output starts poisoned, so every
// byte must be written. Prints a line a job: "ok", or "corrupt" when a warp flagged a corrupt stream.
// tests/test_cuda_emulation.py compares the outputs with the CPU decoders.
#include "cuda_emulator.h"

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "../../cuda/szp_decode.cuh"
#include "../../cuda/szpe_decode.cuh"

using namespace moeoffload;

namespace {

template <template <DType> class Launch, typename... A>
void by_dtype(DType t, A&&... a) {
  switch (t) {
    case DType::F32: return Launch<DType::F32>::run(a...);
    case DType::BF16: return Launch<DType::BF16>::run(a...);
    case DType::F16: return Launch<DType::F16>::run(a...);
  }
}

template <DType T>
struct SzpeValues {
  static void run(const uint8_t* in, const SzpeView& e, void* out, int* failed) {
    using namespace szpe_cuda;
    using Sink = ValueSink<T>;
    moeoffload_emulation::launch(dim3(static_cast<unsigned>(grid_blocks(e))), dim3(kThreads), &szpe_kernel<Sink, NoFrame>,
                                 in, e, Sink{in, static_cast<typename Stored<T>::type*>(out)}, NoFrame{}, failed);
  }
};

template <DType T>
struct SzpValues {
  static void run(const uint8_t* in, const SzpView& v, void* out) {
    using namespace szp_cuda;
    if (v.n_segments == 0) return;
    moeoffload_emulation::launch(dim3(static_cast<unsigned>(grid_blocks(v))), dim3(kWarpsPerBlock * 32),
                                 &szp_decode_kernel<T>, decode_args(v, in), static_cast<typename Stored<T>::type*>(out));
  }
};

// One job: false when a warp flagged a corrupt stream.
bool decode(const std::string& mode, const char* in_path, const char* out_path) {
  std::ifstream f(in_path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<uint64_t> in_words((bytes.size() + 7) / 8);  // 8-aligned, as a device copy is
  auto* in = reinterpret_cast<uint8_t*>(in_words.data());
  std::memcpy(in, bytes.data(), bytes.size());
  int failed = 0;
  std::vector<uint64_t> out_words;
  size_t out_bytes = 0;
  auto poisoned = [&](size_t n) {
    out_bytes = n;
    out_words.assign((n + 7) / 8, 0xA5A5A5A5A5A5A5A5ull);
    return out_words.data();
  };
  if (mode == "szp-values") {
    const SzpView v = szp_parse(in, bytes.size(), true);
    by_dtype<SzpValues>(v.dtype, in, v, poisoned(v.numel * dtype_size(v.dtype)));
  } else {
    const SzpeView e = szpe_parse(in, bytes.size(), true);
    if (mode == "szpe-to-szp") {
      using namespace szpe_cuda;
      auto* out = reinterpret_cast<uint8_t*>(poisoned(e.as_szp.total_bytes));
      moeoffload_emulation::launch(dim3(static_cast<unsigned>(grid_blocks(e))), dim3(kThreads),
                                   &szpe_kernel<SzpSink, SzpFrame>, static_cast<const uint8_t*>(in), e,
                                   SzpSink{in, out}, szp_frame(e), &failed);
    } else if (mode == "szpe-values") {
      by_dtype<SzpeValues>(e.szp.dtype, static_cast<const uint8_t*>(in), e,
                           poisoned(e.szp.numel * dtype_size(e.szp.dtype)), &failed);
    } else {
      std::cerr << "unknown mode " << mode << "\n";
      std::exit(2);
    }
  }
  std::ofstream(out_path, std::ios::binary).write(reinterpret_cast<const char*>(out_words.data()), out_bytes);
  return !failed;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || (argc - 1) % 3) {
    std::cerr << "usage: decoders_emulated MODE IN OUT [MODE IN OUT ...]\n";
    return 2;
  }
  for (int i = 1; i < argc; i += 3) std::cout << (decode(argv[i], argv[i + 1], argv[i + 2]) ? "ok" : "corrupt") << "\n";
  return 0;
}
