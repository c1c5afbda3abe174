// cuda/szpe_decode.cuh's kernels on the CPU emulator (cuda_emulator.h), launched as
// cuda/szpe_decode.cu launches them: `szpe_decode_emulated MODE IN OUT [MODE IN OUT ...]`, MODE szp or
// values, reads each szpe buffer IN and writes to OUT the szp buffer it transcodes to or its values,
// printing a line a job: "ok", or "corrupt" when a warp flagged a corrupt stream.
// tests/test_cuda_emulation.py compares the outputs with the CPU decoders.
#include "cuda_emulator.h"

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "../../cuda/szpe_decode.cuh"
#include "moeoffload/errors.h"

using namespace moeoffload;
using namespace moeoffload::szpe_cuda;

namespace {

// One job: false when a warp flagged a corrupt stream.
bool decode(const std::string& mode, const char* in_path, const char* out_path) {
  std::ifstream f(in_path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<uint64_t> in_words((bytes.size() + 7) / 8);  // 8-aligned, as the device copy is
  auto* in = reinterpret_cast<uint8_t*>(in_words.data());
  std::memcpy(in, bytes.data(), bytes.size());
  const SzpeView e = szpe_parse(in, bytes.size(), true);
  int failed = 0;
  const dim3 grid(static_cast<unsigned>(grid_blocks(e))), block(kThreads);
  std::vector<uint64_t> out_words;
  size_t out_bytes;
  if (mode == "szp") {
    out_bytes = e.as_szp.total_bytes;
    out_words.assign((out_bytes + 7) / 8, 0xA5A5A5A5A5A5A5A5ull);  // poisoned: every byte must be written
    auto* out = reinterpret_cast<uint8_t*>(out_words.data());
    moeoffload_emulation::launch(grid, block, &szpe_kernel<SzpSink, SzpFrame>, static_cast<const uint8_t*>(in), e,
                                 SzpSink{in, out}, szp_frame(e), &failed);
  } else {
    out_bytes = e.szp.numel * dtype_size(e.szp.dtype);
    out_words.assign((out_bytes + 7) / 8, 0xA5A5A5A5A5A5A5A5ull);
    void* out = out_words.data();
    const auto* cin = static_cast<const uint8_t*>(in);
    switch (e.szp.dtype) {
      case DType::F32:
        moeoffload_emulation::launch(grid, block, &szpe_kernel<ValueSink<DType::F32>, NoFrame>, cin, e,
                                     ValueSink<DType::F32>{cin, static_cast<uint32_t*>(out)}, NoFrame{}, &failed);
        break;
      case DType::BF16:
        moeoffload_emulation::launch(grid, block, &szpe_kernel<ValueSink<DType::BF16>, NoFrame>, cin, e,
                                     ValueSink<DType::BF16>{cin, static_cast<uint16_t*>(out)}, NoFrame{}, &failed);
        break;
      case DType::F16:
        moeoffload_emulation::launch(grid, block, &szpe_kernel<ValueSink<DType::F16>, NoFrame>, cin, e,
                                     ValueSink<DType::F16>{cin, static_cast<uint16_t*>(out)}, NoFrame{}, &failed);
        break;
    }
  }
  std::ofstream(out_path, std::ios::binary).write(reinterpret_cast<const char*>(out_words.data()), out_bytes);
  return !failed;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || (argc - 1) % 3) {
    std::cerr << "usage: szpe_decode_emulated MODE IN OUT [MODE IN OUT ...]\n";
    return 2;
  }
  for (int i = 1; i < argc; i += 3) std::cout << (decode(argv[i], argv[i + 1], argv[i + 2]) ? "ok" : "corrupt") << "\n";
  return 0;
}
