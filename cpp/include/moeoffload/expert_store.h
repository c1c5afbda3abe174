// The compressed experts of one model in host memory, one payload per expert
// (all its matrices, back to back). Payloads either live in a table file that
// is mapped read-only and pinned in place (no second copy), or are copied into
// the PinnedPool. Expert ids are flat: layer * experts_per_layer + expert.
//
// Each expert's matrices are parsed once, when they are added (set_matrices):
// a kernel finds a matrix at MatrixInfo::offset of its device cache slot, with
// its SzpView, and never parses again. A matrix is stored either as szp (the
// slot holds the payload's bytes as they are) or as szpe (entropy coded: host
// memory and the bus carry fewer bytes, and the arrival step, arrival.h,
// transcodes it into szp in the slot). The slot layout (resident_bytes) is
// known from the headers alone. A mapped file is checked (size, mtime, inode) before its bytes are
// read (check_file(): before each copy, parse and host read): a table file
// changed on disk raises TableChanged instead of a SIGBUS at the next read.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "moeoffload/fork.h"
#include "moeoffload/pinned_pool.h"
#include "moeoffload/szp.h"
#include "moeoffload/szpe.h"

namespace moeoffload {

struct Payload {
  const uint8_t* data = nullptr;
  uint64_t bytes = 0;
};

enum class Coding : uint8_t { Szp = 0, Szpe = 1 };

// What the manifest says one matrix of an expert is; checked against the
// buffer's own header when the matrix is parsed.
struct MatrixSpec {
  uint64_t offset = 0, bytes = 0;  // inside the expert's payload
  DType dtype = DType::BF16;
  std::vector<uint64_t> shape;
  Coding coding = Coding::Szp;
};

struct MatrixInfo {
  uint64_t offset = 0, bytes = 0;  // the szp buffer in the slot
  SzpView view{};
  Coding coding = Coding::Szp;
  uint64_t host_offset = 0, host_bytes = 0;  // the stored buffer in the payload
  SzpeView coded{};                          // its view when coding is Szpe
};

// Where the matrices of an szpe expert sit in its slot: each szp buffer
// aligned to this (the CUDA transcoder needs 8).
constexpr uint64_t kResidentAlign = 64;

// What a file is and how it was when looked at: a rename over it changes the
// device or inode, a rewrite in place its size or modification time.
struct FileIdentity {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t mtime_ns = 0;  // before 1970 too (st_mtime_ns)
  bool operator==(const FileIdentity& o) const {
    return device == o.device && inode == o.inode && size == o.size && mtime_ns == o.mtime_ns;
  }
};

class ExpertStore {
 public:
  ExpertStore(PinnedPool& pool, uint32_t num_layers, uint32_t experts_per_layer);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Maps `path` read-only and pins it. Call once, before add_mapped(). With
  // `expected`, TableChanged unless the file opened is that one, unchanged:
  // the one a table read its manifest beside (a file replaced or rewritten
  // since then would be served as the table's experts).
  void map_file(const std::string& path, const std::optional<FileIdentity>& expected = std::nullopt);
  uint64_t mapped_bytes() const { return map_bytes_; }
  // False when the backend could not pin the mapping (cudaHostRegister
  // refused it): payloads are then copied from pageable memory. True
  // otherwise (add_copy's payloads are in the pool's pinned memory).
  bool pinned() const { return pinned_; }
  // A payload at [offset, offset + bytes) of the mapped file.
  void add_mapped(uint32_t id, uint64_t offset, uint64_t bytes);
  // A payload copied into pinned memory.
  void add_copy(uint32_t id, const uint8_t* data, uint64_t bytes);
  // Parses (CRC checked) and records the expert's matrices; raises Table when
  // a buffer's shape or dtype differs from its spec, CorruptData when corrupt.
  void set_matrices(uint32_t id, const std::vector<MatrixSpec>& specs);
  MatrixInfo matrix(uint32_t id, uint32_t index) const;
  std::vector<MatrixInfo> matrices(uint32_t id) const;
  uint32_t num_matrices(uint32_t id) const;
  // The bytes an expert takes in a device cache slot: its payload's, or for
  // an szpe expert the szp buffers it transcodes to.
  uint64_t resident_bytes(uint32_t id) const;
  uint64_t max_resident_bytes() const;
  // True when some matrix of the expert is entropy coded (lands by transcode).
  bool coded(uint32_t id) const;

  Payload payload(uint32_t id) const;  // throws InvalidArgument when absent
  // TableChanged when the mapped file changed on disk since map_file().
  void check_file() const;
  bool contains(uint32_t id) const;
  uint32_t num_layers() const { return num_layers_; }
  uint32_t experts_per_layer() const { return experts_per_layer_; }
  uint32_t capacity() const { return num_layers_ * experts_per_layer_; }
  uint64_t max_payload_bytes() const;
  uint64_t total_bytes() const;
  void close();

 private:
  void check_id(uint32_t id) const;
  void check_file_locked() const;
  PinnedPool& pool_;
  uint32_t num_layers_, experts_per_layer_;
  mutable std::mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, 1};
  std::vector<Payload> payloads_;
  std::vector<std::vector<MatrixInfo>> matrices_;
  std::vector<uint64_t> resident_bytes_;  // 0: as the payload
  int map_fd_ = -1;
  FileIdentity map_identity_;
  std::string map_path_;
  std::vector<void*> owned_;  // pool allocations, released on close
  void* map_ = nullptr;
  uint64_t map_bytes_ = 0;
  bool pinned_ = true;
  bool closed_ = false;
};

}  // namespace moeoffload
