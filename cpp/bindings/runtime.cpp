// Bindings of the runtime (cpp/runtime): argument conversion and GIL handling
// only. Every call that can block (waits, copies, closes) releases the GIL;
// Python callbacks run on the copy worker with the GIL taken.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <mutex>

#include "arrays.h"
#include "moeoffload/activation.h"
#include "moeoffload/decision.h"
#include "moeoffload/device_cache.h"
#include "moeoffload/errors.h"
#include "moeoffload/expert_store.h"
#include "moeoffload/pinned_pool.h"
#include "moeoffload/prefetcher.h"
#include "moeoffload/transfer_engine.h"

#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nb = nanobind;
using namespace moeoffload;

namespace {

// A stream argument: None is no stream, an int a cudaStream_t (0 the default stream, not None).
std::optional<void*> as_stream(std::optional<uintptr_t> stream) {
  if (!stream) return std::nullopt;
  return reinterpret_cast<void*>(*stream);
}


using Bytes = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig>;
using bindings::HostBytes;
using Floats = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Counts = nb::ndarray<const uint32_t, nb::c_contig, nb::device::cpu>;

// A Python object held by native code that may drop it on a worker thread.
struct PyRef {
  nb::object obj;
  explicit PyRef(nb::object o) : obj(std::move(o)) {}
  ~PyRef() {
    if (!Py_IsInitialized()) {
      obj.release();  // interpreter gone: leak rather than crash
      return;
    }
    nb::gil_scoped_acquire gil;
    obj.reset();
  }
};

Transfer::Callback python_callback(nb::object fn, nb::object keep_alive) {
  auto ref = std::make_shared<PyRef>(nb::make_tuple(fn, keep_alive));
  return [ref](const Transfer& t) {
    nb::gil_scoped_acquire gil;
    try {
      nb::object f = nb::borrow<nb::tuple>(ref->obj)[0];
      if (!f.is_none()) f(t.tag(), t.failed());
    } catch (nb::python_error& e) {
      e.discard_as_unraisable("moeoffload transfer callback");
    }
  };
}

void check_device(Backend b, const Bytes& a, const char* what) {
  const bool on_cuda = a.device_type() == nb::device::cuda::value;
  if ((b == Backend::Cuda) != on_cuda)
    throw Error(ErrorKind::InvalidArgument, std::string(what) + " must live on the " + backend_name(b) +
                                                " backend's device (host memory for cpu, a CUDA tensor for cuda)");
}

nb::dict cache_stats_dict(const CacheStats& s) {
  nb::dict d;
  d["accesses"] = s.accesses;
  d["hits"] = s.hits;
  d["inflight_hits"] = s.inflight_hits;
  d["misses"] = s.misses;
  d["prefetches"] = s.prefetches;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetch_unused"] = s.prefetch_unused;
  d["evictions"] = s.evictions;
  d["bytes_loaded"] = s.bytes_loaded;
  d["peak_used"] = s.peak_used;
  return d;
}

std::vector<uint32_t> id_list(const std::vector<uint32_t>& ids) { return ids; }

// A decision step's hidden_next: null when the argument is missing (the step names that mistake), a
// valid pointer with size 0 for an empty array (no prediction this step).
const float* hidden_data(const std::optional<Floats>& hidden) {
  static const float none = 0.0f;
  return !hidden ? nullptr : hidden->size() ? hidden->data() : &none;
}

// f() with the decision step's lock held and the GIL released throughout: a holder of the lock never
// waits for the GIL, so neither a Python thread waiting for the lock nor a fork (which takes the lock,
// HeldAcrossFork, from a thread that holds the GIL) can deadlock with it. f copies out what Python needs.
template <class F>
auto with_step(const DecisionStep& d, F&& f) {
  nb::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(d.mutex());
  return f();
}

// A 2-D numpy array owning `v` (rows x cols).
template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> owned_2d(std::unique_ptr<std::vector<T>> v, size_t rows, size_t cols) {
  T* data = v->data();
  nb::capsule owner(v.release(), [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<2>>(data, {rows, cols}, owner);
}

nb::list plan_list(const std::vector<PrefetchItem>& plan) {
  nb::list out;
  for (auto& it : plan) out.append(nb::make_tuple(it.id, it.priority));
  return out;
}

}  // namespace

void bind_runtime(nb::module_& m) {
  m.attr("RESIDENT_ALIGN") = kResidentAlign;  // where an szpe expert's szp buffers start in its slot
  m.def("parse_backend", [](const std::string& s) { return std::string(backend_name(parse_backend(s))); });

  // ---- PinnedPool ----
  nb::class_<PinnedPool>(m, "PinnedPool")
      .def("__init__", [](PinnedPool* p, const std::string& backend) { new (p) PinnedPool(parse_backend(backend)); },
           nb::arg("backend") = "auto")
      .def_prop_ro("backend", [](const PinnedPool& p) { return std::string(backend_name(p.backend())); })
      .def("allocate", [](PinnedPool& p, size_t n) { return reinterpret_cast<uintptr_t>(p.allocate(n)); }, nb::arg("bytes"))
      .def("release", [](PinnedPool& p, uintptr_t ptr) { p.release(reinterpret_cast<void*>(ptr)); }, nb::arg("ptr"))
      .def("trim", &PinnedPool::trim)
      .def("close", &PinnedPool::close, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("closed", &PinnedPool::closed)
      .def("stats", [](const PinnedPool& p) {
        PinnedPoolStats s = p.stats();
        nb::dict d;
        d["bytes_reserved"] = s.bytes_reserved;
        d["bytes_used"] = s.bytes_used;
        d["bytes_registered"] = s.bytes_registered;
        d["allocations"] = s.allocations;
        d["live_allocations"] = s.live_allocations;
        return d;
      });

  // ---- ExpertStore ----
  nb::class_<ExpertStore>(m, "ExpertStore")
      .def(nb::init<PinnedPool&, uint32_t, uint32_t>(), nb::arg("pool"), nb::arg("num_layers"),
           nb::arg("experts_per_layer"), nb::keep_alive<1, 2>())
      .def("map_file", [](ExpertStore& s, const std::string& path,
                          std::optional<std::tuple<uint64_t, uint64_t, uint64_t, int64_t>> expected) {
        std::optional<FileIdentity> id;
        if (expected) id = FileIdentity{std::get<0>(*expected), std::get<1>(*expected), std::get<2>(*expected),
                                        std::get<3>(*expected)};
        nb::gil_scoped_release release;
        s.map_file(path, id);
      }, nb::arg("path"), nb::arg("expected") = nb::none(),
         "Maps the table file; with expected = (st_dev, st_ino, st_size, st_mtime_ns), TableChangedError unless "
         "the file is that one, unchanged.")
      .def("add_mapped", &ExpertStore::add_mapped, nb::arg("id"), nb::arg("offset"), nb::arg("bytes"))
      .def("add_copy", [](ExpertStore& s, uint32_t id, HostBytes b) {
        nb::gil_scoped_release release;
        s.add_copy(id, b.data(), b.shape(0));
      }, nb::arg("id"), nb::arg("payload"))
      .def("set_matrices", [](ExpertStore& s, uint32_t id, std::vector<std::tuple<uint64_t, uint64_t, int, std::vector<uint64_t>>> specs,
                              const std::string& codec) {
        if (codec != "szp" && codec != "szpe")
          throw Error(ErrorKind::InvalidArgument, "codec must be 'szp' or 'szpe', got '" + codec + "'");
        std::vector<MatrixSpec> out;
        for (auto& [offset, bytes, dtype, shape] : specs) {
          if (!dtype_is_valid(static_cast<uint32_t>(dtype)))
            throw Error(ErrorKind::UnsupportedDtype, "unknown dtype code " + std::to_string(dtype));
          out.push_back(MatrixSpec{offset, bytes, static_cast<DType>(dtype), shape,
                                   codec == "szpe" ? Coding::Szpe : Coding::Szp});
        }
        nb::gil_scoped_release release;
        s.set_matrices(id, out);
      }, nb::arg("id"), nb::arg("specs"), nb::arg("codec") = "szp")
      .def("resident_bytes", &ExpertStore::resident_bytes, nb::arg("id"))
      .def("num_matrices", &ExpertStore::num_matrices, nb::arg("id"))
      .def("payload", [](const ExpertStore& s, uint32_t id) {
        // A copy: a view would dangle once the store is closed.
        auto* buf = new std::vector<uint8_t>();
        {
          nb::gil_scoped_release release;
          Payload p = s.payload(id);
          s.check_file();
          buf->assign(p.data, p.data + p.bytes);
        }
        nb::capsule owner(buf, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
        return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(buf->data(), {buf->size()}, owner);
      }, nb::arg("id"))
      .def("__contains__", &ExpertStore::contains)
      .def_prop_ro("num_layers", &ExpertStore::num_layers)
      .def_prop_ro("experts_per_layer", &ExpertStore::experts_per_layer)
      .def_prop_ro("mapped_bytes", &ExpertStore::mapped_bytes)
      .def_prop_ro("pinned", &ExpertStore::pinned)
      .def_prop_ro("max_payload_bytes", &ExpertStore::max_payload_bytes)
      .def_prop_ro("total_bytes", &ExpertStore::total_bytes)
      .def("close", &ExpertStore::close, nb::call_guard<nb::gil_scoped_release>());

  // ---- TransferEngine ----
  nb::class_<Transfer>(m, "Transfer")
      .def("done", &Transfer::done)
      .def("failed", &Transfer::failed)
      .def_prop_ro("error", &Transfer::error)
      .def("wait", &Transfer::wait, nb::arg("timeout") = -1.0, nb::call_guard<nb::gil_scoped_release>())
      .def("add_callback", [](Transfer& t, nb::object fn) { t.add_callback(python_callback(fn, nb::none())); },
           nb::arg("fn"))
      .def_prop_ro("bytes", &Transfer::bytes)
      .def_prop_ro("tag", &Transfer::tag)
      .def_prop_ro("stream_index", &Transfer::stream_index)
      .def_prop_ro("cuda_event", &Transfer::cuda_event)
      .def_prop_ro("done_ns", &Transfer::done_ns,
                   "When the copy was seen to land (time.monotonic_ns()'s clock on Linux); 0 until it is done")
      .def("order", [](const Transfer& t, uintptr_t stream) { t.order(reinterpret_cast<void*>(stream)); },
           nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
           "Make work on `stream` (a cudaStream_t as an int, e.g. torch.cuda.current_stream().cuda_stream) see "
           "the copy: ordered after its event without a host wait on cuda (once the copy worker recorded it), "
           "waited for on cpu and for szpe arrivals. Raises the copy's error.");

  nb::class_<TransferEngine>(m, "TransferEngine")
      .def("__init__", [](TransferEngine* e, const std::string& backend, int streams, int issue_ahead) {
        new (e) TransferEngine(parse_backend(backend), streams, issue_ahead);
      }, nb::arg("backend") = "auto", nb::arg("num_streams") = 2, nb::arg("issue_ahead") = TransferEngine::kMaxIssued,
           "issue_ahead (cuda, 1 to 8): copies a stream queues on the device ahead of the one it completes")
      .def("copy", [](TransferEngine& e, HostBytes src, Bytes dst, uint64_t tag, nb::object callback) {
        check_device(e.backend(), dst, "dst");
        if (dst.shape(0) < src.shape(0))
          throw Error(ErrorKind::Shape, "dst holds " + std::to_string(dst.shape(0)) + " bytes, src " +
                                            std::to_string(src.shape(0)));
        // The callback holder keeps src and dst alive until the copy lands.
        auto cb = python_callback(callback, nb::make_tuple(nb::cast(src), nb::cast(dst)));
        nb::gil_scoped_release release;
        return e.copy(src.data(), dst.data(), src.shape(0), tag, std::move(cb));
      }, nb::arg("src"), nb::arg("dst"), nb::arg("tag") = 0, nb::arg("callback") = nb::none())
      .def("synchronize", &TransferEngine::synchronize, nb::call_guard<nb::gil_scoped_release>())
      .def("close", &TransferEngine::close, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("num_streams", &TransferEngine::num_streams)
      .def_prop_ro("issue_ahead", &TransferEngine::issue_ahead)
      .def_prop_ro("backend", [](const TransferEngine& e) { return std::string(backend_name(e.backend())); })
      .def("cuda_stream", &TransferEngine::cuda_stream, nb::arg("index"))
      .def("stats", [](const TransferEngine& e) {
        TransferStats s = e.stats();
        nb::dict d;
        d["copies"] = s.copies;
        d["bytes"] = s.bytes;
        d["in_flight"] = s.in_flight;
        return d;
      });

  // ---- CacheIndex (decisions only; the simulator drives it) ----
  nb::class_<CacheIndex>(m, "CacheIndex")
      .def("__init__", [](CacheIndex* c, uint64_t budget, const std::string& policy, uint32_t layers, uint32_t experts,
                          uint64_t max_bytes) {
        new (c) CacheIndex(budget, parse_eviction_policy(policy), layers, experts, max_bytes);
      }, nb::arg("budget"), nb::arg("policy"), nb::arg("num_layers"), nb::arg("experts_per_layer"),
           nb::arg("max_expert_bytes"))
      .def("access", [](CacheIndex& c, uint32_t id) { return static_cast<int>(c.access(id)); }, nb::arg("id"))
      .def("insert_demand", [](CacheIndex& c, uint32_t id, uint64_t bytes) {
        std::vector<uint32_t> ev;
        uint64_t off = c.insert_demand(id, bytes, &ev);
        return nb::make_tuple(off, ev);
      }, nb::arg("id"), nb::arg("bytes"))
      .def("insert_prefetch", [](CacheIndex& c, uint32_t id, uint64_t bytes, double priority) -> nb::object {
        std::vector<uint32_t> ev;
        auto off = c.insert_prefetch(id, bytes, priority, &ev);
        if (!off) return nb::none();
        return nb::make_tuple(*off, ev);
      }, nb::arg("id"), nb::arg("bytes"), nb::arg("priority"))
      .def("mark_ready", &CacheIndex::mark_ready, nb::arg("id"))
      .def("abort_loading", &CacheIndex::abort_loading, nb::arg("id"))
      .def("pin", &CacheIndex::pin, nb::arg("id"))
      .def("unpin", &CacheIndex::unpin, nb::arg("id"))
      .def("set_current_layer", &CacheIndex::set_current_layer, nb::arg("layer"))
      .def("set_activation", [](CacheIndex& c, Floats a) { c.set_activation(a.data(), a.size()); }, nb::arg("activation"))
      .def("activation_priority", &CacheIndex::activation_priority, nb::arg("id"))
      .def("__contains__", &CacheIndex::contains)
      .def("ready", &CacheIndex::ready, nb::arg("id"))
      .def("loading", &CacheIndex::loading, nb::arg("id"))
      .def("pins", &CacheIndex::pins, nb::arg("id"))
      .def("resident", [](const CacheIndex& c) { return id_list(c.resident()); })
      .def("loading_ids", [](const CacheIndex& c) { return id_list(c.loading_ids()); })
      .def_prop_ro("used_bytes", &CacheIndex::used_bytes)
      .def_prop_ro("budget", &CacheIndex::budget)
      .def_prop_ro("policy", [](const CacheIndex& c) { return std::string(eviction_policy_name(c.policy())); })
      .def("stats", [](const CacheIndex& c) { return cache_stats_dict(c.stats()); })
      .def("reset_stats", &CacheIndex::reset_stats)
      .def("check_invariants", &CacheIndex::check_invariants);

  // ---- DeviceCache ----
  nb::class_<Slot>(m, "Slot")
      .def_ro("id", &Slot::id)
      .def_prop_ro("data_ptr", [](const Slot& s) { return reinterpret_cast<uintptr_t>(s.data); })
      .def_ro("bytes", &Slot::bytes)
      .def_prop_ro("lookup", [](const Slot& s) {
        return std::string(s.lookup == Lookup::Hit ? "hit" : s.lookup == Lookup::InFlight ? "in_flight" : "miss");
      })
      .def_ro("transfer", &Slot::transfer)
      .def("wait", &Slot::wait, nb::arg("timeout") = -1.0, nb::call_guard<nb::gil_scoped_release>());

  nb::class_<DeviceCache>(m, "DeviceCache")
      .def("__init__", [](DeviceCache* c, uint64_t budget, const std::string& policy, ExpertStore& store,
                          TransferEngine& engine) {
        new (c) DeviceCache(budget, parse_eviction_policy(policy), store, engine);
      }, nb::arg("budget"), nb::arg("policy"), nb::arg("store"), nb::arg("engine"), nb::keep_alive<1, 4>(),
           nb::keep_alive<1, 5>())
      .def("acquire", &DeviceCache::acquire, nb::arg("id"), nb::arg("timeout") = 10.0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("release", [](DeviceCache& c, uint32_t id, std::optional<uintptr_t> stream) {
        c.release(id, as_stream(stream));
      }, nb::arg("id"), nb::arg("stream").none() = nb::none(), nb::call_guard<nb::gil_scoped_release>(),
         "Unpin an expert. stream (cuda, a cudaStream_t as an int; 0 is the default stream): kernels queued on it "
         "may still read the slot; a later fetch into its bytes waits for them on its copy stream")
      .def("acquire_ahead", [](DeviceCache& c, std::vector<uint32_t> ids, bool holding_pins, double timeout) {
        nb::gil_scoped_release release;
        return c.acquire_ahead(ids.data(), ids.size(), holding_pins, timeout);
      }, nb::arg("ids"), nb::arg("holding_pins"), nb::arg("timeout") = 10.0)
      .def("release_all", [](DeviceCache& c, std::vector<uint32_t> ids, std::optional<uintptr_t> stream) {
        nb::gil_scoped_release release;
        c.release_all(ids.data(), ids.size(), as_stream(stream));
      }, nb::arg("ids"), nb::arg("stream").none() = nb::none())
      .def("prefetch", &DeviceCache::prefetch, nb::arg("id"), nb::arg("priority"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("set_current_layer", &DeviceCache::set_current_layer, nb::arg("layer"))
      .def("decide", [](DeviceCache& c, DecisionStep& d, uint32_t layer, Counts experts, std::optional<Floats> hidden) {
        return with_step(d, [&] {
          return c.apply(d.step(layer, experts.data(), experts.size(), hidden_data(hidden), hidden ? hidden->size() : 0));
        });
      }, nb::arg("step"), nb::arg("layer"), nb::arg("experts"), nb::arg("hidden_next").none() = nb::none())
      .def("set_activation", [](DeviceCache& c, Floats a) { c.set_activation(a.data(), a.size()); }, nb::arg("activation"))
      .def("__contains__", &DeviceCache::contains)
      .def("ready", &DeviceCache::ready, nb::arg("id"))
      .def("resident", [](DeviceCache& c) { return id_list(c.resident()); })
      .def_prop_ro("used_bytes", &DeviceCache::used_bytes)
      .def_prop_ro("budget", &DeviceCache::budget)
      .def("stats", [](DeviceCache& c) { return cache_stats_dict(c.stats()); })
      .def("reset_stats", &DeviceCache::reset_stats)
      .def("check_invariants", &DeviceCache::check_invariants)
      .def("read", [](DeviceCache& c, const Slot& s) {
        // A host copy of a slot's bytes (tests, debugging), while the slot is pinned.
        auto* buf = new std::vector<uint8_t>(s.bytes);
        try {
          nb::gil_scoped_release release;
          s.wait();
          auto held = c.pinned_slot(s.id);  // ClosedError once the cache is closed
          if (!held || held->data != s.data) {
            throw Error(ErrorKind::InvalidArgument, "slot of expert " + std::to_string(s.id) +
                                                        " was released: its bytes may hold another expert now");
          }
#if MOEOFFLOAD_WITH_CUDA
          cudaPointerAttributes attr{};
          if (cudaPointerGetAttributes(&attr, s.data) == cudaSuccess && attr.type == cudaMemoryTypeDevice)
            cuda_check(cudaMemcpy(buf->data(), s.data, s.bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
          else
            std::memcpy(buf->data(), s.data, s.bytes);
          cudaGetLastError();
#else
          std::memcpy(buf->data(), s.data, s.bytes);
#endif
        } catch (...) {
          delete buf;
          throw;
        }
        nb::capsule owner(buf, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
        return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(buf->data(), {buf->size()}, owner);
      }, nb::arg("slot"))
      .def("synchronize", &DeviceCache::synchronize, nb::call_guard<nb::gil_scoped_release>())
      .def("close", &DeviceCache::close, nb::call_guard<nb::gil_scoped_release>());

  // ---- activation tracing, prediction, prefetch planning ----
  nb::class_<ActivationTracer>(m, "ActivationTracer")
      .def(nb::init<uint32_t, uint32_t>(), nb::arg("num_layers"), nb::arg("experts_per_layer"))
      .def("begin_sequence", &ActivationTracer::begin_sequence)
      .def("record", [](ActivationTracer& t, uint32_t layer, Counts experts) {
        t.record(layer, experts.data(), experts.size());
      }, nb::arg("layer"), nb::arg("experts"))
      .def("matrix", [](const ActivationTracer& t) {
        auto* v = new std::vector<uint32_t>(t.matrix());
        nb::capsule owner(v, [](void* p) noexcept { delete static_cast<std::vector<uint32_t>*>(p); });
        return nb::ndarray<nb::numpy, uint32_t, nb::ndim<2>>(v->data(), {t.num_layers(), t.experts_per_layer()}, owner);
      })
      .def_prop_ro("layers_seen", &ActivationTracer::layers_seen);

  nb::class_<ActivationHistory>(m, "ActivationHistory")
      .def(nb::init<uint32_t, uint32_t, size_t>(), nb::arg("num_layers"), nb::arg("experts_per_layer"),
           nb::arg("capacity"))
      .def("add", [](ActivationHistory& h, Counts m) { return h.add(m.data(), m.size()); }, nb::arg("matrix"))
      .def("__len__", &ActivationHistory::size)
      .def_prop_ro("capacity", &ActivationHistory::capacity)
      .def_prop_ro("num_layers", &ActivationHistory::num_layers)
      .def_prop_ro("experts_per_layer", &ActivationHistory::experts_per_layer)
      .def("flat", [](const ActivationHistory& h) {
        auto* v = new std::vector<uint32_t>(h.flat());
        nb::capsule owner(v, [](void* p) noexcept { delete static_cast<std::vector<uint32_t>*>(p); });
        return nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(v->data(), {v->size()}, owner);
      })
      .def("clear", &ActivationHistory::clear)
      .def("predict", [](const ActivationHistory& h, Counts current, uint32_t layers_seen, uint32_t top) {
        auto* v = new std::vector<float>(current.size());
        {
          nb::gil_scoped_release release;
          h.predict(current.data(), current.size(), layers_seen, top, v->data());
        }
        nb::capsule owner(v, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
        return nb::ndarray<nb::numpy, float, nb::ndim<1>>(v->data(), {v->size()}, owner);
      }, nb::arg("current"), nb::arg("layers_seen"), nb::arg("top_matches") = 4);

  nb::class_<DecisionStep>(m, "DecisionStep")
      .def("__init__", [](DecisionStep* d, uint32_t layers, uint32_t experts, std::shared_ptr<ActivationHistory> history,
                          const std::string& source, bool activation_priorities, uint32_t depth, uint32_t per_layer,
                          double min_probability, uint32_t top_matches, double recency, double self_weight) {
        DecisionConfig cfg{parse_prefetch_source(source), activation_priorities,
                           PrefetchConfig{depth, per_layer, min_probability}, top_matches, recency, self_weight};
        new (d) DecisionStep(layers, experts, std::move(history), cfg);
      }, nb::arg("num_layers"), nb::arg("experts_per_layer"), nb::arg("history").none(), nb::arg("source"),
         nb::arg("activation_priorities"), nb::arg("depth") = 2, nb::arg("per_layer") = 3,
         nb::arg("min_probability") = 0.05, nb::arg("top_matches") = 4, nb::arg("recency") = 1.0,
         nb::arg("self_weight") = 1.0)
      .def("begin_sequence", [](DecisionStep& d) { with_step(d, [&] { d.begin_sequence(); }); })
      .def("end_sequence", [](DecisionStep& d) { return with_step(d, [&] { return d.end_sequence(); }); })
      .def("step", [](DecisionStep& d, uint32_t layer, Counts experts, std::optional<Floats> hidden, CacheIndex* index) {
        const std::vector<PrefetchItem> plan = with_step(d, [&] {
          const Decision& dec = d.step(layer, experts.data(), experts.size(), hidden_data(hidden),
                                       hidden ? hidden->size() : 0);
          if (index) apply_priorities(dec, *index);
          return dec.plan;
        });
        return plan_list(plan);
      }, nb::arg("layer"), nb::arg("experts"), nb::arg("hidden_next").none() = nb::none(),
         nb::arg("index").none() = nb::none())
      .def("prediction", [](const DecisionStep& d) -> nb::object {
        // The last step's [layers, experts] prediction (a copy), None when that step made none.
        auto v = with_step(d, [&]() -> std::unique_ptr<std::vector<float>> {
          if (d.tracer().layers_seen() == 0 || !d.predicts()) return nullptr;
          return std::make_unique<std::vector<float>>(d.last().activation, d.last().activation + d.last().activation_size);
        });
        if (!v) return nb::none();
        return nb::cast(owned_2d(std::move(v), d.num_layers(), d.experts_per_layer()));
      })
      .def("matrix", [](const DecisionStep& d) {
        auto v = with_step(d, [&] { return std::make_unique<std::vector<uint32_t>>(d.tracer().matrix()); });
        return owned_2d(std::move(v), d.num_layers(), d.experts_per_layer());
      })
      .def_prop_ro("history", &DecisionStep::history)
      .def_prop_ro("needs_hidden", &DecisionStep::needs_hidden)
      .def_prop_ro("predicts", &DecisionStep::predicts);

  m.def("plan_prefetch", [](Floats prediction, uint32_t layers, uint32_t experts, uint32_t current, uint32_t depth,
                            uint32_t per_layer, double min_probability) {
    if (prediction.size() != static_cast<size_t>(layers) * experts)
      throw Error(ErrorKind::Shape, "prediction must hold layers x experts values");
    PrefetchConfig cfg{depth, per_layer, min_probability};
    return plan_list(plan_prefetch(prediction.data(), layers, experts, current, cfg));
  }, nb::arg("prediction"), nb::arg("num_layers"), nb::arg("experts_per_layer"), nb::arg("current_layer"),
     nb::arg("depth") = 2, nb::arg("per_layer") = 3, nb::arg("min_probability") = 0.05);
}
