// The runtime: one owner for the pieces that hold and move experts (pinned
// pool, expert store, transfer engine, device cache), closed in the right
// order, and the integer handles through which ops reach expert matrices.
//
// Lifetimes: close() (or the destructor) first stops new work, then waits for
// every op using an expert (a shared lock each op holds while it computes)
// and every copy in flight, then frees the cache, stops the copy threads,
// unmaps/unpins the store and frees the pool. Python objects handed out
// (slots, transfers) own nothing: a slot is a value whose data_ptr is valid
// while its expert is pinned and the runtime open, and what reads through one
// after close (ExpertCache.read, the ops) raises Closed.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "moeoffload/cpu_kernels.h"
#include "moeoffload/device_cache.h"
#include "moeoffload/expert_store.h"
#include "moeoffload/fork.h"
#include "moeoffload/pinned_pool.h"
#include "moeoffload/transfer_engine.h"

namespace moeoffload {

// One matrix an op may read for as long as it holds the Use: its address
// (device memory on cuda), parsed view, and the copy to order after (null
// when the bytes are in place).
struct MatrixUse {
  SzpMatrix matrix;
  Backend backend = Backend::Cpu;
  std::shared_ptr<Transfer> transfer;
  std::shared_lock<std::shared_mutex> guard;
};

// Something ops address by (handle, expert, matrix index).
class MatrixSource : public std::enable_shared_from_this<MatrixSource> {
 public:
  virtual ~MatrixSource() = default;
  // The source's read lock: held while an op reads its matrices (a writer, close or remove, waits).
  virtual std::shared_lock<std::shared_mutex> lock() = 0;
  // The same without waiting: owns_lock() tells whether it was taken.
  virtual std::shared_lock<std::shared_mutex> try_lock() = 0;
  // A matrix, for a caller that holds lock() (the Use's own guard is empty). An op that reads several
  // matrices of one source takes lock() once: a thread must not take a shared_mutex twice.
  virtual MatrixUse use_locked(uint32_t expert, uint32_t index) = 0;
  // lock() and use_locked() in one, the guard in the Use.
  MatrixUse use(uint32_t expert, uint32_t index) {
    std::shared_lock<std::shared_mutex> guard = lock();
    MatrixUse u = use_locked(expert, index);
    u.guard = std::move(guard);
    return u;
  }
};

// The read locks of two sources, never one held while waiting for the other: fork() takes the host
// matrices' locks exclusively one after another, and a reader holding one while it waited for a
// second would wait for fork, which waits for it.
std::pair<std::shared_lock<std::shared_mutex>, std::shared_lock<std::shared_mutex>> lock_both(MatrixSource& a,
                                                                                            MatrixSource& b);

// Registered sources (held weakly); handles are never reused. find() raises
// InvalidArgument for an unknown handle and Closed for a closed or freed source.
int64_t register_source(std::shared_ptr<MatrixSource> source);
std::shared_ptr<MatrixSource> find_source(int64_t handle);

// szp buffers in host memory, parsed once: CompressedTensors outside a runtime.
class HostMatrices : public MatrixSource {
 public:
  // Copies and parses `bytes`; returns its expert id (matrix index 0).
  uint32_t add(const uint8_t* bytes, size_t len);
  void remove(uint32_t expert);  // frees its bytes; the id is not reused
  std::shared_lock<std::shared_mutex> lock() override { return std::shared_lock<std::shared_mutex>(mu_); }
  std::shared_lock<std::shared_mutex> try_lock() override {
    return std::shared_lock<std::shared_mutex>(mu_, std::try_to_lock);
  }
  MatrixUse use_locked(uint32_t expert, uint32_t index) override;

 private:
  std::shared_mutex mu_;
  HeldAcrossFork mu_across_fork_{mu_, -2};  // first: fork waits for its readers holding nothing else
  std::vector<std::pair<std::vector<uint8_t>, SzpMatrix>> items_;
};

class Runtime : public MatrixSource {
 public:
  Runtime(Backend backend, uint32_t num_layers, uint32_t experts_per_layer, int num_streams);
  ~Runtime() override;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  ExpertStore& store();   // filled by the table loader before start()
  PinnedPool& pool();
  TransferEngine& engine();
  DeviceCache& cache();   // Closed before start() and after close()
  void start(uint64_t budget, EvictionPolicy policy);  // creates the device cache
  // The matrix of a pinned (acquired) expert; InvalidArgument when the
  // caller does not hold it pinned.
  std::shared_lock<std::shared_mutex> lock() override;  // Forked in a child (see close())
  std::shared_lock<std::shared_mutex> try_lock() override;
  MatrixUse use_locked(uint32_t expert, uint32_t index) override;
  int64_t handle();       // registers on first call
  Backend backend() const { return backend_; }
  // In a child forked after the runtime was made, close() takes no lock (an op of a thread the child
  // does not have may hold the op lock) and leaks the pool, store, engine and cache: no CUDA there.
  void close();
  bool closed() const;

 private:
  void check_open() const;
  void check_not_forked() const;
  Backend backend_;
  uint64_t generation_;
  std::unique_ptr<PinnedPool> pool_;
  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<TransferEngine> engine_;
  std::unique_ptr<DeviceCache> cache_;
  mutable std::shared_mutex use_mu_;  // ops hold it shared; close() exclusively
  std::atomic<bool> closed_{false};
  int64_t handle_ = -1;
};

}  // namespace moeoffload
