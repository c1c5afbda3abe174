#include "moeoffload/runtime.h"

#include <atomic>
#include <thread>
#include <unordered_map>

#include "moeoffload/errors.h"

namespace moeoffload {

// ---- handles ----------------------------------------------------------------

namespace {
std::mutex g_sources_mu;
std::unordered_map<int64_t, std::weak_ptr<MatrixSource>>& sources() {
  static auto* m = new std::unordered_map<int64_t, std::weak_ptr<MatrixSource>>();  // never destroyed: ops may run at exit
  return *m;
}
int64_t g_next_handle = 1;
}  // namespace

int64_t register_source(std::shared_ptr<MatrixSource> source) {
  std::lock_guard<std::mutex> lock(g_sources_mu);
  const int64_t h = g_next_handle++;
  sources()[h] = source;
  return h;
}

std::pair<std::shared_lock<std::shared_mutex>, std::shared_lock<std::shared_mutex>> lock_both(MatrixSource& a,
                                                                                            MatrixSource& b) {
  for (;;) {
    std::shared_lock<std::shared_mutex> first = a.lock();
    std::shared_lock<std::shared_mutex> second = b.try_lock();
    if (second.owns_lock()) return {std::move(first), std::move(second)};
    first.unlock();
    std::this_thread::yield();
  }
}

std::shared_ptr<MatrixSource> find_source(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_sources_mu);
  auto it = sources().find(handle);
  if (it == sources().end())
    throw Error(ErrorKind::InvalidArgument, "no moeoffload runtime or compressed matrix has handle " +
                                                std::to_string(handle));
  auto s = it->second.lock();
  if (!s) throw Error(ErrorKind::Closed, "the runtime (or compressed matrix) of handle " + std::to_string(handle) +
                                             " was closed");
  return s;
}

// ---- HostMatrices -------------------------------------------------------------

uint32_t HostMatrices::add(const uint8_t* bytes, size_t len) {
  std::vector<uint8_t> copy(bytes, bytes + len);
  const SzpView v = szp_parse(copy.data(), copy.size(), true);
  std::unique_lock<std::shared_mutex> lock(mu_);
  items_.emplace_back(std::move(copy), SzpMatrix{});
  auto& item = items_.back();
  item.second.buf = item.first.data();
  item.second.view = v;  // rows and cols: szp_matrix() at the ops that need a matrix
  return static_cast<uint32_t>(items_.size() - 1);
}

void HostMatrices::remove(uint32_t expert) {
  std::unique_lock<std::shared_mutex> lock(mu_);
  if (expert < items_.size()) {
    items_[expert].first = std::vector<uint8_t>();
    items_[expert].second = SzpMatrix{};
  }
}

MatrixUse HostMatrices::use_locked(uint32_t expert, uint32_t index) {
  MatrixUse u;
  if (expert >= items_.size() || index != 0 || items_[expert].second.buf == nullptr)
    throw Error(ErrorKind::InvalidArgument, "no compressed matrix (" + std::to_string(expert) + ", " +
                                                std::to_string(index) + ") here");
  u.matrix = items_[expert].second;
  u.backend = Backend::Cpu;
  return u;
}

// ---- Runtime ------------------------------------------------------------------

Runtime::Runtime(Backend backend, uint32_t num_layers, uint32_t experts_per_layer, int num_streams)
    : backend_(backend), generation_(fork_generation()) {
  pool_ = std::make_unique<PinnedPool>(backend);
  store_ = std::make_unique<ExpertStore>(*pool_, num_layers, experts_per_layer);
  engine_ = std::make_unique<TransferEngine>(backend, num_streams);
}

Runtime::~Runtime() {
  try {
    close();
  } catch (...) {
  }
}

// The op lock may be held by a thread a forked child does not have: the child never takes it.
void Runtime::check_not_forked() const {
  if (generation_ != fork_generation())
    throw Error(ErrorKind::Forked, "this runtime (ExpertCache) was created before fork(): build a new one in the child");
}

void Runtime::check_open() const {
  if (closed_) throw Error(ErrorKind::Closed, "the runtime (ExpertCache) is closed");
}

ExpertStore& Runtime::store() {
  check_open();
  return *store_;
}
PinnedPool& Runtime::pool() {
  check_open();
  return *pool_;
}
TransferEngine& Runtime::engine() {
  check_open();
  return *engine_;
}
DeviceCache& Runtime::cache() {
  check_open();
  if (!cache_) throw Error(ErrorKind::Closed, "the runtime has no device cache yet (start() was not called)");
  return *cache_;
}

void Runtime::start(uint64_t budget, EvictionPolicy policy) {
  check_not_forked();
  std::unique_lock<std::shared_mutex> lock(use_mu_);
  check_open();
  if (cache_) throw Error(ErrorKind::InvalidArgument, "the runtime is started already");
  cache_ = std::make_unique<DeviceCache>(budget, policy, *store_, *engine_);
}

MatrixUse Runtime::use_locked(uint32_t expert, uint32_t index) {
  MatrixUse u;
  check_open();
  if (!cache_) throw Error(ErrorKind::Closed, "the runtime has no device cache yet");
  if (expert >= store_->capacity())
    throw Error(ErrorKind::InvalidArgument, "expert id " + std::to_string(expert) + " out of range (the runtime holds " +
                                                std::to_string(store_->capacity()) + ")");
  auto slot = cache_->pinned_slot(expert);
  if (!slot)
    throw Error(ErrorKind::InvalidArgument,
                "expert " + std::to_string(expert) + " is not acquired: acquire() it before an op reads it, and "
                "release() it after");
  const MatrixInfo info = store_->matrix(expert, index);
  u.matrix = szp_matrix(slot->data + info.offset, info.view, "expert matrix");
  u.backend = backend_;
  u.transfer = slot->transfer;
  return u;
}

int64_t Runtime::handle() {
  check_not_forked();
  std::unique_lock<std::shared_mutex> lock(use_mu_);
  check_open();
  if (handle_ < 0) handle_ = register_source(shared_from_this());
  return handle_;
}

std::shared_lock<std::shared_mutex> Runtime::lock() {
  check_not_forked();
  return std::shared_lock<std::shared_mutex>(use_mu_);
}

std::shared_lock<std::shared_mutex> Runtime::try_lock() {
  check_not_forked();
  return std::shared_lock<std::shared_mutex>(use_mu_, std::try_to_lock);
}

void Runtime::close() {
  if (generation_ != fork_generation()) {
    if (closed_.exchange(true)) return;
    (void)cache_.release(), (void)engine_.release(), (void)store_.release(), (void)pool_.release();
    return;
  }
  std::unique_lock<std::shared_mutex> lock(use_mu_);  // waits for ops in progress
  if (closed_) return;
  closed_ = true;
  // the handle stays registered (weakly): ops on it raise Closed, not "unknown"
  if (cache_) cache_->close();  // waits for copies in flight, frees the device memory
  engine_->close();
  store_->close();
  pool_->close();
}

bool Runtime::closed() const { return closed_; }

}  // namespace moeoffload
