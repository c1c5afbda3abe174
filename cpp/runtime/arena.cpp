#include "moeoffload/arena.h"

#include <algorithm>

#include "moeoffload/errors.h"

namespace moeoffload {

Arena::Arena(uint64_t capacity) : capacity_(capacity / kAlign * kAlign) {
  if (capacity_ > 0) free_.emplace(0, capacity_);
}

std::optional<uint64_t> Arena::allocate(uint64_t bytes) {
  const uint64_t size = slot_size(bytes == 0 ? 1 : bytes);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const uint64_t offset = it->first, rest = it->second - size;
    free_.erase(it);
    if (rest) free_.emplace(offset + size, rest);
    live_.emplace(offset, size);
    used_ += size;
    return offset;
  }
  return std::nullopt;
}

void Arena::free(uint64_t offset) {
  auto it = live_.find(offset);
  if (it == live_.end()) throw Error(ErrorKind::InvalidArgument, "Arena::free: no slot at offset " + std::to_string(offset));
  uint64_t start = offset, size = it->second;
  live_.erase(it);
  used_ -= size;
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, size);
}

void Arena::reserve(uint64_t offset, uint64_t bytes) {
  const uint64_t size = slot_size(bytes == 0 ? 1 : bytes);
  auto it = free_.upper_bound(offset);
  if (it == free_.begin() || std::prev(it)->first + std::prev(it)->second < offset + size)
    throw Error(ErrorKind::InvalidArgument, "Arena::reserve: [" + std::to_string(offset) + ", +" +
                                                std::to_string(size) + ") is not free");
  --it;
  const uint64_t start = it->first, end = it->first + it->second;
  free_.erase(it);
  if (start < offset) free_.emplace(start, offset - start);
  if (offset + size < end) free_.emplace(offset + size, end - offset - size);
  live_.emplace(offset, size);
  used_ += size;
}

uint64_t Arena::largest_free() const {
  uint64_t m = 0;
  for (auto& [o, s] : free_) m = std::max(m, s);
  return m;
}

}  // namespace moeoffload
