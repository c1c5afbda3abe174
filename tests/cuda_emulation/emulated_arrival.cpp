// The runtime's way of putting experts on a device, on the CPU emulator with its asynchronous copy
// streams (cuda_runtime.h here): a pinned pool and an expert store of backend cuda, a TransferEngine
// whose workers stage each payload, transcode its szpe matrices on their copy stream (arrival.cpp, an
// expert's matrices in one launch) and read the failure flag back after the stream's event; and a
// compute stream ordered after copies still queued (Transfer::order); and a slot released while a
// kernel reading it is still queued (DeviceCache::release with its stream). For
// tests/cuda_emulation/checks.py, behind a C interface like emulated_kernels.cpp's.
#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "moeoffload/arrival.h"
#include "moeoffload/device_cache.h"
#include "moeoffload/errors.h"
#include "moeoffload/expert_store.h"
#include "moeoffload/pinned_pool.h"
#include "moeoffload/transfer_engine.h"

using namespace moeoffload;

namespace {
thread_local std::string arrival_error;

// Where the checks' "kernels" run: a stream of its own, or the default one (torch's stream 0), whose
// reads can be queued behind other work so that they run well after the host has moved on.
class ComputeStream {
 public:
  explicit ComputeStream(bool default_stream) {
    moeoffload_emulation::Uncounted harness;  // (a check's own device work never has a call made to fail)
    if (!default_stream) cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "compute stream");
    scratch_ = static_cast<uint8_t*>(device_alloc(Backend::Cuda, 1));
  }
  ~ComputeStream() {
    moeoffload_emulation::Uncounted harness;
    if (destroyed_) {
      cudaDeviceSynchronize();  // the destroyed stream's work still reads scratch_
    } else {
      cudaStreamSynchronize(stream_);
      if (stream_) cudaStreamDestroy(stream_);
    }
    device_free(Backend::Cuda, scratch_);
  }
  cudaStream_t get() const { return stream_; }
  // cudaStreamDestroy now: it returns at once and the work queued still runs; the handle goes to the
  // next stream created.
  void destroy() {
    cuda_check(cudaStreamDestroy(stream_), "cudaStreamDestroy");
    destroyed_ = true;
  }
  // Queues, behind `delay` other items, a read of `out.size()` bytes at `device` into `out`.
  void read_later(std::vector<uint8_t>& out, const uint8_t* device, int delay) {
    moeoffload_emulation::Uncounted harness;
    for (int i = 0; i < delay; ++i) cuda_check(cudaMemsetAsync(scratch_, 0, 1, stream_), "delay");
    cuda_check(cudaMemcpyAsync(out.data(), device, out.size(), cudaMemcpyDeviceToHost, stream_), "the read");
  }
  // The `bytes` at `device`, read after the work queued so far.
  std::vector<uint8_t> read_now(const uint8_t* device, uint64_t bytes) {
    moeoffload_emulation::Uncounted harness;
    std::vector<uint8_t> out(bytes);
    read_later(out, device, 0);
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }

 private:
  cudaStream_t stream_ = nullptr;
  uint8_t* scratch_ = nullptr;
  bool destroyed_ = false;
};

// Two experts of `bytes` each (all 0x11, all 0x22) and a device cache with room for one, on one copy stream.
struct TwoExperts {
  explicit TwoExperts(uint64_t bytes) : a(bytes, 0x11), b(bytes, 0x22) {
    store.add_copy(0, a.data(), bytes);
    store.add_copy(1, b.data(), bytes);
    cache.emplace(round_up(bytes, 256), EvictionPolicy::Lru, store, engine);  // over the experts just added
  }
  // Expert 0 released (from the slot s0 it had), expert 1's fetch evicts it into the same bytes; throws
  // unless expert 1 lands there whole as `compute` reads it. Expert 1 is released again.
  void evict_into(const Slot& s0, ComputeStream& compute) {
    Slot s1 = cache->acquire(1);
    if (s1.data != s0.data) throw Error(ErrorKind::InvalidArgument, "expert 1 did not take expert 0's bytes");
    s1.wait();
    if (compute.read_now(s1.data, b.size()) != b) throw Error(ErrorKind::InvalidArgument, "expert 1 did not land whole");
    cache->release(1);
  }
  std::vector<uint8_t> a, b;
  PinnedPool pool{Backend::Cuda};
  ExpertStore store{pool, 1, 2};
  TransferEngine engine{Backend::Cuda, 1};
  std::optional<DeviceCache> cache;
};

// Expert i has n_matrices[i] matrices, the next ones of buffers/lengths/codings (0 szp, 1 szpe): each
// expert's payload is its buffers back to back, each 8-aligned. Throws unless expert i takes
// slot_bytes[i] in a device slot.
void add_experts(ExpertStore& store, uint32_t n_experts, const uint32_t* n_matrices, const uint8_t* const* buffers,
                 const uint64_t* lengths, const int* codings, const uint64_t* slot_bytes) {
  for (uint32_t id = 0, m = 0; id < n_experts; m += n_matrices[id], ++id) {
    std::vector<uint8_t> payload;
    std::vector<MatrixSpec> specs;
    for (uint32_t j = m; j < m + n_matrices[id]; ++j) {
      MatrixSpec spec;
      spec.offset = (payload.size() + 7) / 8 * 8;
      spec.bytes = lengths[j];
      spec.coding = codings[j] ? Coding::Szpe : Coding::Szp;
      const SzpView v = codings[j] ? szpe_parse(buffers[j], lengths[j], true).szp : szp_parse(buffers[j], lengths[j], true);
      spec.dtype = v.dtype;
      spec.shape.assign(v.shape, v.shape + v.ndim);
      payload.resize(spec.offset + spec.bytes);
      std::memcpy(payload.data() + spec.offset, buffers[j], spec.bytes);
      specs.push_back(spec);
    }
    store.add_copy(id, payload.data(), payload.size());
    store.set_matrices(id, specs);
    if (store.resident_bytes(id) != slot_bytes[id])
      throw Error(ErrorKind::InvalidArgument, "expert " + std::to_string(id) + " takes " +
                                                  std::to_string(store.resident_bytes(id)) + " bytes in a slot");
  }
}

// `copies` pinned host buffers of `bytes` each, buffer i all i + 1, and as many device buffers; freed
// when it goes (declare it before the engine and streams that copy from and into them).
struct NumberedBuffers {
  NumberedBuffers(uint32_t copies, uint64_t bytes) : src(copies), dst(copies) {
    for (uint32_t i = 0; i < copies; ++i) {
      src[i] = static_cast<uint8_t*>(host_alloc(Backend::Cuda, bytes));
      std::memset(src[i], static_cast<int>(i + 1), bytes);
      dst[i] = static_cast<uint8_t*>(device_alloc(Backend::Cuda, bytes));
    }
  }
  ~NumberedBuffers() {
    for (uint8_t* p : src) host_free(Backend::Cuda, p);
    for (uint8_t* p : dst) device_free(Backend::Cuda, p);
  }
  std::vector<uint8_t*> src, dst;
};

// How many of the bytes a queued read saw are not `want`.
int bytes_other_than(const std::vector<uint8_t>& seen, uint8_t want) {
  int n = 0;
  for (uint8_t v : seen) n += v != want;
  return n;
}
}  // namespace

extern "C" {

const char* emu_arrival_error() { return arrival_error.c_str(); }

// The longest pause of a host thread resuming after a wait for the device (cuda_runtime.h), in µs.
void emu_set_late_wake(uint32_t us) { moeoffload_emulation::late_wake_us() = us; }

// Expert i has n_matrices[i] matrices, the next ones of buffers/lengths/codings (as add_experts); every expert is copied at once on
// `streams` copy streams (each issuing `issue_ahead` copies ahead) into a device slot of its resident size, then read back into slots[i]
// (slot_bytes[i] must be that size). An expert whose transfer fails gets its error in
// errors[i * error_len ...]; "" when it landed. Returns 0, or -1 with emu_arrival_error() when the
// store or engine refuses the input.
int emu_arrivals(uint32_t n_experts, const uint32_t* n_matrices, const uint8_t* const* buffers,
                 const uint64_t* lengths, const int* codings, int streams, int issue_ahead, uint8_t* const* slots,
                 const uint64_t* slot_bytes, char* errors, uint64_t error_len) {
  try {
    PinnedPool pool(Backend::Cuda);
    ExpertStore store(pool, 1, n_experts);
    add_experts(store, n_experts, n_matrices, buffers, lengths, codings, slot_bytes);
    TransferEngine engine(Backend::Cuda, streams, issue_ahead);
    std::vector<uint8_t*> device(n_experts);
    std::vector<std::shared_ptr<Transfer>> transfers;
    for (uint32_t id = 0; id < n_experts; ++id) {
      device[id] = static_cast<uint8_t*>(device_alloc(Backend::Cuda, slot_bytes[id]));
      const Payload p = store.payload(id);
      transfers.push_back(engine.copy(p.data, device[id], p.bytes, id, {}, arrival_for(store, id, Backend::Cuda)));
    }
    for (uint32_t id = 0; id < n_experts; ++id) {
      std::string error;
      try {
        transfers[id]->wait();
        cuda_check(cudaMemcpyAsync(slots[id], device[id], slot_bytes[id], cudaMemcpyDeviceToHost, nullptr), "read back");
        cuda_check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
      } catch (const Error& e) {
        error = std::string(e.python_name()) + ": " + e.what();
      }
      std::strncpy(errors + id * error_len, error.c_str(), error_len - 1);
    }
    engine.close();
    for (uint8_t* d : device) device_free(Backend::Cuda, d);
    return 0;
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// `copies` copies of `bytes` each queued on one copy stream, and at once, for each from the last (queued
// behind all the others, so its worker has not reached it), a compute stream ordered after it
// (Transfer::order, no host wait) reading its destination back: the number of copies whose bytes the
// compute stream did not see, or -1 with emu_arrival_error().
int emu_ordered_reads(uint32_t copies, uint64_t bytes) {
  try {
    std::vector<std::vector<uint8_t>> seen(copies, std::vector<uint8_t>(bytes));  // before compute: it reads into them
    NumberedBuffers buffers(copies, bytes);
    TransferEngine engine(Backend::Cuda, 1);
    ComputeStream compute(false);
    std::vector<std::shared_ptr<Transfer>> transfers;
    for (uint32_t i = 0; i < copies; ++i) transfers.push_back(engine.copy(buffers.src[i], buffers.dst[i], bytes, i));
    for (uint32_t i = copies; i-- > 0;) {
      transfers[i]->order(compute.get());
      compute.read_later(seen[i], buffers.dst[i], 0);
    }
    cuda_check(cudaStreamSynchronize(compute.get()), "cudaStreamSynchronize");
    engine.close();
    int wrong = 0;
    for (uint32_t i = 0; i < copies; ++i) wrong += std::memcmp(seen[i].data(), buffers.src[i], bytes) != 0;
    return wrong;
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// `copies` copies of `bytes` each (every fourth one expanded: an szp-only arrival, copied matrix by
// matrix on the copy stream) queued on two copy streams, and the engine closed at once, with them all
// still queued or in flight: close() must land every one. Returns how many did not land whole, or -1
// with emu_arrival_error().
int emu_close_in_flight(uint32_t copies, uint64_t bytes) {
  try {
    NumberedBuffers buffers(copies, bytes);
    std::vector<std::shared_ptr<Transfer>> transfers;
    TransferEngine engine(Backend::Cuda, 2);
    Expand copy_through = [bytes](const uint8_t* staged, uint8_t* out, void* stream, int*) {
      cuda_check(cudaMemcpyAsync(out, staged, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)),
                 "cudaMemcpyAsync");
    };
    for (uint32_t i = 0; i < copies; ++i)
      transfers.push_back(engine.copy(buffers.src[i], buffers.dst[i], bytes, i, {}, i % 4 == 3 ? copy_through : Expand{}));
    engine.close();
    int wrong = 0;
    ComputeStream compute(false);
    for (uint32_t i = 0; i < copies; ++i)
      wrong += !transfers[i]->done() || transfers[i]->failed() ||
               compute.read_now(buffers.dst[i], bytes) != std::vector<uint8_t>(bytes, static_cast<uint8_t>(i + 1));
    return wrong;
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// Two experts of `bytes` each (all 0x11, all 0x22) and a device cache with room for one. A read of
// expert 0's slot is queued on a compute stream (a stream of its own, or with `default_stream` the
// default one, torch's stream 0) behind `delay` other items; expert 0 is released with that stream
// (`fenced`) or without, and expert 1's fetch evicts it into the same bytes. Returns how many bytes the
// read saw that were not expert 0's (0: the fetch waited for it), or -1 with emu_arrival_error() (also
// when expert 1 did not land whole).
int emu_fenced_release(uint64_t bytes, int fenced, int delay, int default_stream) {
  try {
    std::vector<uint8_t> seen(bytes);  // before compute: it reads into seen
    TwoExperts two(bytes);
    ComputeStream compute(default_stream != 0);
    Slot s0 = two.cache->acquire(0);
    if (s0.transfer) s0.transfer->order(compute.get());
    compute.read_later(seen, s0.data, delay);
    two.cache->release(0, fenced ? std::optional<void*>(compute.get()) : std::nullopt);
    two.evict_into(s0, compute);
    two.cache->close();
    return bytes_other_than(seen, 0x11);
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// A stream destroyed with a read still queued hands its handle to the next stream: a fence of the new
// stream on the same slot does not stand for the old one's. Two experts of `bytes` (0x11, 0x22), room
// for one: a read of expert 0 is queued on stream A behind `delay` items, expert 0 released with A, A
// destroyed; stream B (A's handle again) acquires expert 0 (a hit) and releases it with nothing queued;
// expert 1's fetch evicts it. Returns how many bytes the read saw that were not expert 0's, or -1 with
// emu_arrival_error() (also when B did not get A's handle or expert 1 did not land whole).
int emu_reused_stream_handle(uint64_t bytes, int delay) {
  try {
    std::vector<uint8_t> seen(bytes);  // before the streams: they read into seen
    TwoExperts two(bytes);
    ComputeStream first(false);
    Slot s0 = two.cache->acquire(0);
    if (s0.transfer) s0.transfer->order(first.get());
    first.read_later(seen, s0.data, delay);
    two.cache->release(0, first.get());
    const cudaStream_t handle = first.get();
    first.destroy();
    ComputeStream second(false);
    if (second.get() != handle) throw Error(ErrorKind::InvalidArgument, "the new stream did not get the old handle");
    Slot again = two.cache->acquire(0);
    if (again.data != s0.data) throw Error(ErrorKind::InvalidArgument, "expert 0 moved");
    two.cache->release(0, second.get());
    two.evict_into(s0, second);
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");  // the destroyed stream's read, before close frees
    two.cache->close();
    return bytes_other_than(seen, 0x11);
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// A slot's fence that a fetch overlaps only in part is still there for the next fetch into the rest of
// its bytes. Slots of u = 64 KiB in a cache of 3u on two copy streams: experts A, B, C (u each) land at
// 0, u, 2u, C stays pinned; a read of B's slot is queued behind `delay` items on a compute stream and B
// released with it, A without; D (1.5u) evicts A and B and lands at 0 (waiting for B's fence), then E
// (0.5u) lands at 1.5u, the rest of B's bytes, on the other copy stream. Returns how many bytes the
// read saw that were not B's, or -1 with emu_arrival_error() (also when D or E did not land whole or
// not where the cache's first-fit placement puts them).
int emu_partial_fences(int delay) {
  try {
    const uint64_t u = 1 << 16;
    PinnedPool pool(Backend::Cuda);
    ExpertStore store(pool, 1, 5);
    const uint64_t sizes[5] = {u, u, u, u + u / 2, u / 2};
    std::vector<std::vector<uint8_t>> payload;
    for (uint32_t id = 0; id < 5; ++id) {
      payload.emplace_back(sizes[id], static_cast<uint8_t>(0xA0 + id));
      store.add_copy(id, payload[id].data(), sizes[id]);
    }
    std::vector<uint8_t> seen(u);  // before compute: it reads into seen
    TransferEngine engine(Backend::Cuda, 2);
    DeviceCache cache(3 * u, EvictionPolicy::Lru, store, engine);
    ComputeStream compute(false);
    std::vector<Slot> slots;
    for (uint32_t id = 0; id < 3; ++id) {
      slots.push_back(cache.acquire(id));
      slots.back().wait();
    }
    compute.read_later(seen, slots[1].data, delay);
    cache.release(0);
    cache.release(1, compute.get());
    Slot d = cache.acquire(3), e = cache.acquire(4);
    const uint8_t* base = slots[0].data;
    if (d.data != base || e.data != base + u + u / 2)
      throw Error(ErrorKind::InvalidArgument, "D and E are not where first fit puts them");
    for (const Slot* s : {&d, &e}) {
      s->wait();
      if (compute.read_now(s->data, s->bytes) != payload[s->id])
        throw Error(ErrorKind::InvalidArgument, "an expert did not land whole");
    }
    for (uint32_t id : {2u, 3u, 4u}) cache.release(id);
    cache.close();
    return bytes_other_than(seen, 0xA1);
  } catch (const std::exception& e) {
    arrival_error = e.what();
    return -1;
  }
}

// The copy path with one CUDA call failing: the nth call of `call` (a runtime function, or "launch":
// cuda_runtime.h's fail_call) counted from the first fetch. The experts (as emu_arrivals'), a device
// cache with room for about a quarter of them, `streams` copy streams. Round one, with the fault armed:
// each expert in turn is acquired, waited for, read on a compute stream behind `delay` items into
// seen[i], and released with that stream, so that later fetches evict it and wait for its fence.
// Round two, disarmed: each is acquired again, waited for and read back into slots[i]. errors[i]: what
// round one's acquire, wait or release of expert i raised, after which of them ("wait CudaError: ...";
// "" if nothing). Returns how many times the
// fault fired (0 or 1), or -1 with emu_arrival_error() when anything else failed (round two included).
int emu_faulty_fetches(const char* call, int nth, uint32_t n_experts, const uint32_t* n_matrices,
                       const uint8_t* const* buffers, const uint64_t* lengths, const int* codings, int streams,
                       int delay, uint8_t* const* seen, uint8_t* const* slots, const uint64_t* slot_bytes,
                       char* errors, uint64_t error_len) {
  try {
    PinnedPool pool(Backend::Cuda);
    ExpertStore store(pool, 1, n_experts);
    add_experts(store, n_experts, n_matrices, buffers, lengths, codings, slot_bytes);
    uint64_t total = 0, largest = 0;
    for (uint32_t id = 0; id < n_experts; ++id) {
      total += round_up(slot_bytes[id], 256);
      largest = std::max(largest, round_up(slot_bytes[id], 256));
    }
    TransferEngine engine(Backend::Cuda, streams);
    DeviceCache cache(std::max(largest, total / 4), EvictionPolicy::Lru, store, engine);
    ComputeStream compute(false);
    std::vector<std::vector<uint8_t>> read(n_experts);
    moeoffload_emulation::fail_call(call, nth);
    for (uint32_t id = 0; id < n_experts; ++id) {
      std::string error;
      const char* stage = "acquire";
      try {
        Slot slot = cache.acquire(id);
        try {
          stage = "wait";
          slot.wait();
          read[id].resize(slot_bytes[id]);
          compute.read_later(read[id], slot.data, delay);
        } catch (const Error& e) {
          error = std::string(stage) + " " + e.python_name() + ": " + e.what();
        }
        stage = "release";
        cache.release(id, compute.get());
      } catch (const Error& e) {
        if (error.empty()) error = std::string(stage) + " " + e.python_name() + ": " + e.what();
      }
      std::strncpy(errors + id * error_len, error.c_str(), error_len - 1);
    }
    cache.synchronize();
    const int fired = moeoffload_emulation::fault_fired();
    moeoffload_emulation::fail_call("", 0);
    cuda_check(cudaStreamSynchronize(compute.get()), "cudaStreamSynchronize");
    for (uint32_t id = 0; id < n_experts; ++id)
      if (!read[id].empty()) std::memcpy(seen[id], read[id].data(), slot_bytes[id]);
    for (uint32_t id = 0; id < n_experts; ++id) {
      Slot slot = cache.acquire(id);
      slot.wait();
      const std::vector<uint8_t> now = compute.read_now(slot.data, slot_bytes[id]);
      std::memcpy(slots[id], now.data(), slot_bytes[id]);
      cache.release(id, compute.get());
    }
    cache.check_invariants();
    cache.close();
    engine.close();
    return fired;
  } catch (const std::exception& e) {
    moeoffload_emulation::fail_call("", 0);
    arrival_error = e.what();
    return -1;
  }
}

}  // extern "C"
