#include "moeoffload/expert_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "moeoffload/errors.h"

namespace moeoffload {

ExpertStore::ExpertStore(PinnedPool& pool, uint32_t num_layers, uint32_t experts_per_layer)
    : pool_(pool), num_layers_(num_layers), experts_per_layer_(experts_per_layer) {
  if (num_layers == 0 || experts_per_layer == 0)
    throw Error(ErrorKind::InvalidArgument, "ExpertStore needs at least one layer and one expert");
  payloads_.resize(static_cast<size_t>(num_layers) * experts_per_layer);
  matrices_.resize(payloads_.size());
  resident_bytes_.resize(payloads_.size(), 0);
}

ExpertStore::~ExpertStore() {
  try {
    close();
  } catch (...) {
  }
}

void ExpertStore::check_id(uint32_t id) const {
  if (closed_) throw Error(ErrorKind::Closed, "ExpertStore is closed");
  if (id >= payloads_.size())
    throw Error(ErrorKind::InvalidArgument,
                "expert id " + std::to_string(id) + " out of range (store holds " + std::to_string(payloads_.size()) + ")");
}

namespace {

FileIdentity identity_of(const struct stat& st) {
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<uint64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000ll + static_cast<int64_t>(st.st_mtim.tv_nsec)};
}

}  // namespace

void ExpertStore::map_file(const std::string& path, const std::optional<FileIdentity>& expected) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw Error(ErrorKind::Closed, "ExpertStore is closed");
  if (map_) throw Error(ErrorKind::InvalidArgument, "ExpertStore already maps a file");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(ErrorKind::InvalidArgument, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    ::close(fd);
    throw Error(ErrorKind::CorruptData, "table file " + path + " is empty or unreadable");
  }
  if (expected && !(identity_of(st) == *expected)) {
    ::close(fd);
    throw Error(ErrorKind::TableChanged, "the table file " + path + " changed on disk since the table was loaded "
                                         "(replaced or rewritten): its manifest may not describe it. Load the table "
                                         "again");
  }
  void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) {
    ::close(fd);
    throw Error(ErrorKind::InvalidArgument, "cannot map " + path + ": " + std::strerror(errno));
  }
  map_fd_ = fd;  // kept open: fstat before each hand-out detects a file changed on disk
  map_identity_ = identity_of(st);
  map_path_ = path;
  try {
    pool_.register_range(p, static_cast<size_t>(st.st_size));
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Cuda) {
      ::munmap(p, static_cast<size_t>(st.st_size));
      throw;
    }
    // A device or driver that cannot pin a read-only file mapping: keep it
    // pageable. Copies still work (the driver stages them), only slower.
    pinned_ = false;
  }
  map_ = p;
  map_bytes_ = static_cast<uint64_t>(st.st_size);
}

void ExpertStore::add_mapped(uint32_t id, uint64_t offset, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  if (!map_) throw Error(ErrorKind::InvalidArgument, "ExpertStore.add_mapped before map_file");
  if (bytes == 0 || offset > map_bytes_ || bytes > map_bytes_ - offset)
    throw Error(ErrorKind::CorruptData, "payload of expert " + std::to_string(id) + " [" + std::to_string(offset) +
                                            ", +" + std::to_string(bytes) + ") lies outside the mapped file of " +
                                            std::to_string(map_bytes_) + " bytes");
  payloads_[id] = {static_cast<const uint8_t*>(map_) + offset, bytes};
}

void ExpertStore::add_copy(uint32_t id, const uint8_t* data, uint64_t bytes) {
  if (bytes == 0) throw Error(ErrorKind::InvalidArgument, "empty payload for expert " + std::to_string(id));
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_id(id);
  }
  void* p = pool_.allocate(bytes);
  std::memcpy(p, data, bytes);
  std::lock_guard<std::mutex> lock(mu_);
  owned_.push_back(p);
  payloads_[id] = {static_cast<const uint8_t*>(p), bytes};
}

void ExpertStore::check_file_locked() const {
  if (map_fd_ < 0) return;
  struct stat st {};
  const bool same = ::fstat(map_fd_, &st) == 0 && identity_of(st) == map_identity_;
  if (!same)
    throw Error(ErrorKind::TableChanged,
                "the table file " + map_path_ + " changed on disk while it was loaded (mapped mode); reading it now "
                "could crash the process. Load the table again, or load it with mode=\"copy\" so that later changes "
                "to the file do not matter");
}

void ExpertStore::check_file() const {
  std::lock_guard<std::mutex> lock(mu_);
  check_file_locked();
}

void ExpertStore::set_matrices(uint32_t id, const std::vector<MatrixSpec>& specs) {
  const Payload p = payload(id);
  check_file();
  std::vector<MatrixInfo> out;
  bool coded = false;
  uint64_t resident = 0;  // the slot's size when some matrix is coded
  for (size_t i = 0; i < specs.size(); ++i) {
    const MatrixSpec& s = specs[i];
    const std::string where = "expert " + std::to_string(id) + " matrix " + std::to_string(i);
    // 8-aligned: the CUDA kernels read szp's and szpe's offset tables with u64 loads, from the slot's
    // (256-aligned) base plus this offset
    if (s.offset > p.bytes || s.bytes > p.bytes - s.offset || s.offset % 8)
      throw Error(ErrorKind::Table, where + ": [" + std::to_string(s.offset) + ", +" + std::to_string(s.bytes) +
                                        ") does not lie 8-aligned inside its payload of " + std::to_string(p.bytes) +
                                        " bytes");
    MatrixInfo m;
    m.coding = s.coding;
    m.host_offset = s.offset;
    m.host_bytes = s.bytes;
    if (s.coding == Coding::Szpe) {
      m.coded = szpe_parse(p.data + s.offset, s.bytes, true);
      m.view = m.coded.as_szp;
      coded = true;
    } else {
      m.view = szp_parse(p.data + s.offset, s.bytes, true);
    }
    bool same_shape = m.view.ndim == s.shape.size();
    for (uint32_t d = 0; same_shape && d < m.view.ndim; ++d) same_shape = m.view.shape[d] == s.shape[d];
    if (!same_shape || m.view.dtype != s.dtype)
      throw Error(ErrorKind::Table, where + ": the manifest says " + dtype_name(s.dtype) + " of " +
                                        std::to_string(s.shape.size()) + " dims, the buffer holds " +
                                        dtype_name(m.view.dtype) + " of another shape; the manifest does not "
                                        "describe this table file: rebuild the table");
    m.bytes = m.view.total_bytes;
    out.push_back(m);
  }
  // An expert with a coded matrix lands as szp buffers laid out anew; otherwise the slot is the payload.
  for (MatrixInfo& m : out) {
    if (!coded) {
      m.offset = m.host_offset;
      continue;
    }
    m.offset = (resident + kResidentAlign - 1) / kResidentAlign * kResidentAlign;
    resident = m.offset + m.bytes;
  }
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  matrices_[id] = std::move(out);
  resident_bytes_[id] = coded ? resident : 0;
}

MatrixInfo ExpertStore::matrix(uint32_t id, uint32_t index) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  if (index >= matrices_[id].size())
    throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " has no matrix " +
                                                std::to_string(index) + " (its " + std::to_string(matrices_[id].size()) +
                                                " matrices are numbered from 0)");
  return matrices_[id][index];
}

std::vector<MatrixInfo> ExpertStore::matrices(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  return matrices_[id];
}

uint64_t ExpertStore::resident_bytes(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  return resident_bytes_[id] ? resident_bytes_[id] : payloads_[id].bytes;
}

uint64_t ExpertStore::max_resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t m = 0;
  for (size_t i = 0; i < payloads_.size(); ++i) m = std::max(m, resident_bytes_[i] ? resident_bytes_[i] : payloads_[i].bytes);
  return m;
}

bool ExpertStore::coded(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  return resident_bytes_[id] != 0;
}

uint32_t ExpertStore::num_matrices(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  return static_cast<uint32_t>(matrices_[id].size());
}

Payload ExpertStore::payload(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  if (!payloads_[id].data)
    throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " (layer " +
                                                std::to_string(id / experts_per_layer_) + ", expert " +
                                                std::to_string(id % experts_per_layer_) + ") is not in the store");
  return payloads_[id];
}

bool ExpertStore::contains(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return !closed_ && id < payloads_.size() && payloads_[id].data != nullptr;
}

uint64_t ExpertStore::max_payload_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t m = 0;
  for (const auto& p : payloads_) m = std::max(m, p.bytes);
  return m;
}

uint64_t ExpertStore::total_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t s = 0;
  for (const auto& p : payloads_) s += p.bytes;
  return s;
}

void ExpertStore::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  if (!pool_.closed()) {
    for (void* p : owned_) pool_.release(p);
    if (map_) pool_.unregister_range(map_);
  }
  if (map_) ::munmap(map_, static_cast<size_t>(map_bytes_));
  if (map_fd_ >= 0) ::close(map_fd_);
  map_fd_ = -1;
  owned_.clear();
  matrices_.assign(matrices_.size(), {});
  resident_bytes_.assign(resident_bytes_.size(), 0);
  payloads_.assign(payloads_.size(), Payload{});
  map_ = nullptr;
  closed_ = true;
}

}  // namespace moeoffload
