// What the native build holds and what the machine offers at run time.
#pragma once
#include <string>

namespace moeoffload {

struct BackendInfo {
  bool built_with_cuda = false;
  bool gpu_available = false;
  int device_count = 0;
  std::string device_name;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  std::string reason;  // why no GPU is usable, when none is
};

// Queries the CUDA runtime (if built with it). Never throws; a machine with no
// driver or no GPU reports gpu_available = false with the reason.
BackendInfo query_backend();

}  // namespace moeoffload
