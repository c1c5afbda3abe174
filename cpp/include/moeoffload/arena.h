// First-fit placement of variable-size slots in [0, capacity): the offsets of
// the device cache's one allocation. Pure bookkeeping (the simulator uses it
// without memory); adjacent free ranges are merged on free.
#pragma once
#include <cstdint>
#include <map>
#include <optional>

namespace moeoffload {

class Arena {
 public:
  static constexpr uint64_t kAlign = 256;
  explicit Arena(uint64_t capacity);
  std::optional<uint64_t> allocate(uint64_t bytes);  // nullopt when no free range fits
  void free(uint64_t offset);
  // Takes back the slot of `bytes` at `offset`, which must lie in one free range (a slot freed since
  // nothing was allocated: the undo of free). Throws InvalidArgument otherwise.
  void reserve(uint64_t offset, uint64_t bytes);
  static uint64_t slot_size(uint64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
  uint64_t capacity() const { return capacity_; }
  uint64_t used() const { return used_; }
  uint64_t largest_free() const;

 private:
  uint64_t capacity_, used_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> size
  std::map<uint64_t, uint64_t> live_;  // offset -> size
};

}  // namespace moeoffload
