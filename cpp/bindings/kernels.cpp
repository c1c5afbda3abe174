// Bindings of the fused ops (cpp/kernels, cuda/) and of the runtime owner:
// argument checks, GIL release, device dispatch; no logic. Every op reaches
// its matrices through (handle, expert, matrix index).
#include <cmath>
#include <optional>
#include <tuple>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "arrays.h"
#include "moeoffload/cpu_kernels.h"
#include "moeoffload/errors.h"
#include "moeoffload/moe_experts.h"
#include "moeoffload/runtime.h"
#if MOEOFFLOAD_WITH_CUDA
#include <cuda_runtime.h>

#include "moeoffload/szp_cuda.h"
#endif

namespace nb = nanobind;
using namespace moeoffload;

namespace {

using Array = nb::ndarray<nb::c_contig>;
using bindings::HostBytes;

DType dtype_of(const Array& a, const char* what) {
  const auto d = a.dtype();
  if (d == nb::dtype<float>()) return DType::F32;
  if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return DType::BF16;
  if (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 16) return DType::F16;
  throw Error(ErrorKind::UnsupportedDtype, std::string(what) + " must be float32, bfloat16 or float16");
}

bool on_cuda(const Array& a) { return a.device_type() == nb::device::cuda::value; }

// The device every argument must live on for this use.
void check_device(const MatrixUse& u, const Array& a, const char* what) {
  const bool want_cuda = u.backend == Backend::Cuda;
  if (on_cuda(a) != want_cuda)
    throw Error(ErrorKind::InvalidArgument, std::string(what) + " must be on " +
                                                (want_cuda ? "the CUDA device of the runtime" : "the CPU") +
                                                " (where the compressed expert is)");
}

void check_2d(const Array& a, uint64_t rows, uint64_t cols, const char* what) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols)
    throw Error(ErrorKind::Shape, std::string(what) + " must be [" + std::to_string(rows) + ", " +
                                      std::to_string(cols) + "], got " + std::to_string(a.ndim()) + "-D " +
                                      (a.ndim() ? "[" + std::to_string(a.shape(0)) + (a.ndim() > 1 ? ", " + std::to_string(a.shape(1)) : "") + "]" : ""));
}

// Waits (cpu) or orders `stream` after (cuda) the copy that brings the bytes (Transfer::order).
void order_after(const MatrixUse& u, uintptr_t stream) {
  if (u.transfer) u.transfer->order(reinterpret_cast<void*>(stream));
}

[[noreturn]] void no_cuda() {
  throw Error(ErrorKind::Cuda, "moeoffload was built without CUDA; rebuild with MOEOFFLOAD_CUDA=ON");
}

MlpConfig mlp_config(const std::string& act, int layout, float alpha, float limit) {
  MlpConfig c;
  if (act == "silu") c.act = Activation::Silu;
  else if (act == "gelu") c.act = Activation::Gelu;
  else if (act == "gelu_tanh") c.act = Activation::GeluTanh;
  else if (act == "relu") c.act = Activation::Relu;
  else if (act == "gptoss") c.act = Activation::GptOss;
  else throw Error(ErrorKind::InvalidArgument, "unknown activation " + act + " (silu, gelu, gelu_tanh, relu, gptoss)");
  if (layout != 0 && layout != 1)
    throw Error(ErrorKind::InvalidArgument, "gate layout must be 0 (concatenated) or 1 (interleaved)");
  c.layout = static_cast<GateLayout>(layout);
  // a NaN limit made the kernels skip the clamp (the reference's clamp gives NaN), a negative one
  // clamped differently from torch's: refused for every activation, as the Python forms refuse them
  if (!std::isfinite(alpha)) throw Error(ErrorKind::InvalidArgument, "alpha must be a finite number");
  if (!(limit > 0)) throw Error(ErrorKind::InvalidArgument, "limit must be a number > 0 (inf: no clamp)");
  c.alpha = alpha;
  c.limit = limit;
  return c;
}

// An optional array argument (a bias, a scratch), converted while the GIL is held. The caller keeps
// the returned array for the whole call: when the input was not contiguous it is a copy, and its data
// lives only as long as it does.
std::optional<Array> optional_array(const nb::object& b, const char* what) {
  if (b.is_none()) return std::nullopt;
  try {
    return nb::cast<Array>(b);
  } catch (const nb::cast_error&) {
    throw Error(ErrorKind::UnsupportedDtype, std::string(what) + " must be a tensor (or None)");
  }
}

// The bias's data after checking it: `rows` x n values (rows 0: 1-D n) in x's dtype, where the matrix is.
const void* bias_data(const std::optional<Array>& a, const MatrixUse& u, DType xt, uint64_t rows, uint64_t n,
                      const char* what) {
  if (!a) return nullptr;
  check_device(u, *a, what);
  const bool shape_ok = rows ? a->ndim() == 2 && a->shape(0) == rows && a->shape(1) == n : a->ndim() == 1 && a->shape(0) == n;
  if (dtype_of(*a, what) != xt || !shape_ok)
    throw Error(ErrorKind::Shape, std::string(what) + " must be " + (rows ? std::to_string(rows) + " x " : "1-D of ") +
                                      std::to_string(n) + " values in x's dtype");
  return a->data();
}

// The CUDA scratch's data after checking it: at least `floats` float32 values where the matrix is.
float* scratch_data(const std::optional<Array>& a, const MatrixUse& u, uint64_t floats, const char* op,
                    const char* size) {
  if (!a) throw Error(ErrorKind::Shape, std::string(op) + " on CUDA needs a scratch");
  check_device(u, *a, "scratch");
  if (a->dtype() != nb::dtype<float>() || a->size() < floats)
    throw Error(ErrorKind::Shape, std::string("scratch must hold ") + size + " float32 values");
  return static_cast<float*>(a->data());
}

}  // namespace

void bind_kernels(nb::module_& m) {
  m.def("matrix_info", [](int64_t handle, uint32_t expert, uint32_t index) {
    MatrixUse u = find_source(handle)->use(expert, index);
    nb::dict d;
    nb::list shape;
    for (uint32_t i = 0; i < u.matrix.view.ndim; ++i) shape.append(u.matrix.view.shape[i]);
    d["shape"] = nb::tuple(shape);
    d["dtype"] = static_cast<int>(u.matrix.view.dtype);
    d["backend"] = backend_name(u.backend);
    return d;
  }, nb::arg("handle"), nb::arg("expert"), nb::arg("matrix"));

  m.def("szp_linear", [](int64_t handle, uint32_t expert, uint32_t index, Array x, Array y, uintptr_t stream) {
    std::shared_ptr<MatrixSource> src = find_source(handle);
    nb::gil_scoped_release release;
    MatrixUse u = src->use(expert, index);
    const SzpMatrix w = szp_matrix(u.matrix.buf, u.matrix.view, "the weight");
    const DType xt = dtype_of(x, "x");
    check_device(u, x, "x");
    check_device(u, y, "y");
    if (x.ndim() != 2) throw Error(ErrorKind::Shape, "x must be 2-D [tokens, in]");
    const uint64_t T = x.shape(0);
    check_2d(x, T, w.cols, "x");
    check_2d(y, T, w.rows, "y");
    if (dtype_of(y, "y") != xt) throw Error(ErrorKind::UnsupportedDtype, "y must have x's dtype");
    if (T > 0xFFFFFFFFull) throw Error(ErrorKind::Shape, "too many tokens");
    order_after(u, stream);
    if (u.backend == Backend::Cpu) return szp_linear_cpu(w, x.data(), xt, static_cast<uint32_t>(T), y.data());
#if MOEOFFLOAD_WITH_CUDA
    cuda_check(szp_linear_cuda(w, x.data(), xt, static_cast<uint32_t>(T), y.data(),
                               reinterpret_cast<cudaStream_t>(stream)),
               "szp_linear kernel");
#else
    no_cuda();
#endif
  }, nb::arg("handle"), nb::arg("expert"), nb::arg("matrix"), nb::arg("x"), nb::arg("y").noconvert(), nb::arg("stream") = 0);

  m.def("expert_mlp", [](int64_t gu_handle, uint32_t gu_expert, uint32_t gu_index, int64_t down_handle,
                         uint32_t down_expert, uint32_t down_index, Array x, const std::string& act, int layout,
                         float alpha, float limit, nb::object gate_up_bias, nb::object down_bias, Array y,
                         nb::object scratch, uintptr_t stream) {
    std::shared_ptr<MatrixSource> gsrc = find_source(gu_handle), dsrc = find_source(down_handle);
    const MlpConfig cfg = mlp_config(act, layout, alpha, limit);
    const std::optional<Array> gb_array = optional_array(gate_up_bias, "gate_up_bias");
    const std::optional<Array> db_array = optional_array(down_bias, "down_bias");
    const std::optional<Array> scratch_array = optional_array(scratch, "scratch");
    // The matrices' read locks are taken and dropped without the GIL: a finalizer that removes a matrix
    // waits for them while holding it.
    nb::gil_scoped_release release;
    // One read lock per source: gate_up and down usually share one, and a thread takes it once.
    std::shared_lock<std::shared_mutex> guard, down_guard;
    if (dsrc == gsrc)
      guard = gsrc->lock();
    else
      std::tie(guard, down_guard) = lock_both(*gsrc, *dsrc);
    MatrixUse gu = gsrc->use_locked(gu_expert, gu_index);
    MatrixUse dn = dsrc->use_locked(down_expert, down_index);
    const SzpMatrix g = szp_matrix(gu.matrix.buf, gu.matrix.view, "gate_up");
    const SzpMatrix d = szp_matrix(dn.matrix.buf, dn.matrix.view, "down");
    if (gu.backend != dn.backend) throw Error(ErrorKind::InvalidArgument, "gate_up and down live on different devices");
    const DType xt = dtype_of(x, "x");
    check_device(gu, x, "x");
    check_device(gu, y, "y");
    if (x.ndim() != 2) throw Error(ErrorKind::Shape, "x must be 2-D [tokens, hidden]");
    const uint64_t T = x.shape(0);
    if (g.rows != 2 * d.cols || g.cols != d.rows)
      throw Error(ErrorKind::Shape, "expert_mlp needs gate_up [2I, H] and down [H, I]; got gate_up [" +
                                        std::to_string(g.rows) + ", " + std::to_string(g.cols) + "] and down [" +
                                        std::to_string(d.rows) + ", " + std::to_string(d.cols) + "]");
    check_2d(x, T, g.cols, "x");
    check_2d(y, T, d.rows, "y");
    if (dtype_of(y, "y") != xt) throw Error(ErrorKind::UnsupportedDtype, "y must have x's dtype");
    const void* gb = bias_data(gb_array, gu, xt, 0, g.rows, "gate_up_bias");
    const void* db = bias_data(db_array, gu, xt, 0, d.rows, "down_bias");
    float* scratch_ptr = gu.backend == Backend::Cuda
                             ? scratch_data(scratch_array, gu, T * g.rows, "expert_mlp", "T x 2I")
                             : nullptr;
    order_after(gu, stream);
    order_after(dn, stream);
    if (gu.backend == Backend::Cpu)
      return expert_mlp_cpu(g, d, x.data(), xt, static_cast<uint32_t>(T), cfg, gb, db, y.data());
#if MOEOFFLOAD_WITH_CUDA
    cuda_check(expert_mlp_cuda(g, d, x.data(), xt, static_cast<uint32_t>(T), cfg, gb, db, scratch_ptr, y.data(),
                               reinterpret_cast<cudaStream_t>(stream)),
               "expert_mlp kernels");
#else
    (void)scratch_ptr;
    no_cuda();
#endif
  }, nb::arg("gate_up_handle"), nb::arg("gate_up_expert"), nb::arg("gate_up_matrix"), nb::arg("down_handle"),
     nb::arg("down_expert"), nb::arg("down_matrix"), nb::arg("x"), nb::arg("act"), nb::arg("layout"),
     nb::arg("alpha"), nb::arg("limit"), nb::arg("gate_up_bias").none(), nb::arg("down_bias").none(), nb::arg("y").noconvert(),
     nb::arg("scratch").none().noconvert(), nb::arg("stream") = 0);

  m.attr("MOE_EXPERTS_MAX_CUDA_ASSIGNMENTS") = kMaxCudaAssignments;
  m.def("moe_experts_cuda_scratch", &moe_experts_cuda_scratch, nb::arg("assignments"), nb::arg("H"), nb::arg("I"),
        "float32 values of scratch moe_experts needs on CUDA for T x k assignments (gate and up, then the outputs).");

  m.def("moe_experts", [](int64_t handle, const std::vector<uint32_t>& gate_up_ids, uint32_t gu_index,
                          const std::vector<uint32_t>& down_ids, uint32_t down_index, Array x,
                          nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> routing, Array weights,
                          const std::string& act, int layout, float alpha, float limit, nb::object gate_up_bias,
                          nb::object down_bias, Array out, nb::object scratch, uintptr_t stream) {
    std::shared_ptr<MatrixSource> src = find_source(handle);
    const MlpConfig cfg = mlp_config(act, layout, alpha, limit);
    const std::optional<Array> gb_array = optional_array(gate_up_bias, "gate_up_bias");
    const std::optional<Array> db_array = optional_array(down_bias, "down_bias");
    const std::optional<Array> scratch_array = optional_array(scratch, "scratch");
    // The matrices' read locks are taken and dropped without the GIL (see expert_mlp).
    nb::gil_scoped_release release;
    const uint64_t E = gate_up_ids.size();
    if (down_ids.size() != E) throw Error(ErrorKind::Shape, "gate_up_ids and down_ids must name the same experts");
    if (x.ndim() != 2) throw Error(ErrorKind::Shape, "x must be 2-D [tokens, hidden]");
    const uint64_t T = x.shape(0), H = x.shape(1), k = routing.shape(1);
    if (routing.shape(0) != T) throw Error(ErrorKind::Shape, "routing must be [tokens, k] for x's tokens");
    if (k == 0) throw Error(ErrorKind::Shape, "routing must name at least one expert a token");
    if (T > 0xFFFFFFFFull || k > 0xFFFFull || T * k > 0xFFFFFFFFull)  // (group_routing numbers them in u32)
      throw Error(ErrorKind::Shape, "too many tokens or experts per token (at most 2^32 - 1 token-expert assignments)");
    const DType xt = dtype_of(x, "x");
    if (dtype_of(out, "out") != xt) throw Error(ErrorKind::UnsupportedDtype, "out must have x's dtype");
    check_2d(out, T, H, "out");
    if (weights.dtype() != nb::dtype<float>()) throw Error(ErrorKind::UnsupportedDtype, "weights must be float32");
    check_2d(weights, T, k, "weights");
    if (T == 0) return;
    const Routing r = group_routing(routing.data(), static_cast<uint32_t>(T), static_cast<uint32_t>(k),
                                    static_cast<uint32_t>(E));
    // The routed experts' matrices, read under one hold of the source's lock for the whole call.
    std::shared_lock<std::shared_mutex> guard = src->lock();
    std::vector<MatrixUse> uses;
    std::vector<ExpertMatrices> mats(r.experts.size());
    uint64_t I = 0;
    for (size_t i = 0; i < r.experts.size(); ++i) {
      uses.push_back(src->use_locked(gate_up_ids[r.experts[i]], gu_index));
      uses.push_back(src->use_locked(down_ids[r.experts[i]], down_index));
      const MatrixUse& g = uses[uses.size() - 2];
      const MatrixUse& d = uses.back();
      mats[i].gate_up = szp_matrix(g.matrix.buf, g.matrix.view, "gate_up");
      mats[i].down = szp_matrix(d.matrix.buf, d.matrix.view, "down");
      if (i == 0) I = mats[i].down.cols;
      if (g.backend != uses[0].backend || d.backend != uses[0].backend)
        throw Error(ErrorKind::InvalidArgument, "the experts' matrices live on different devices");
      if (mats[i].gate_up.rows != 2 * I || mats[i].gate_up.cols != H || mats[i].down.rows != H ||
          mats[i].down.cols != I)
        throw Error(ErrorKind::Shape, "expert " + std::to_string(r.experts[i]) + " is not gate_up [2I, H] and down [H, I] "
                                      "with H = " + std::to_string(H) + " (x's) and the I of the others");
    }
    const MatrixUse& any = uses[0];  // T, k > 0: at least one expert is routed
    for (const Array* a : {&x, &out, &weights}) check_device(any, *a, "x, weights and out");
    const auto* gb = static_cast<const uint8_t*>(bias_data(gb_array, any, xt, E, 2 * I, "gate_up_bias"));
    const auto* db = static_cast<const uint8_t*>(bias_data(db_array, any, xt, E, H, "down_bias"));
    const size_t es = static_cast<size_t>(dtype_size(xt));
    for (size_t i = 0; i < r.experts.size(); ++i) {
      if (gb) mats[i].gate_up_bias = gb + r.experts[i] * 2 * I * es;
      if (db) mats[i].down_bias = db + r.experts[i] * H * es;
    }
    float* scratch_ptr = nullptr;
    if (any.backend == Backend::Cuda) {
      if (r.order.size() > kMaxCudaAssignments)
        throw Error(ErrorKind::Shape, "moe_experts on CUDA takes at most " + std::to_string(kMaxCudaAssignments) +
                                          " token-expert assignments a call (run larger batches expert by expert)");
      scratch_ptr = scratch_data(scratch_array, any, moe_experts_cuda_scratch(T * k, H, I), "moe_experts",
                                 "tokens x k x (2I + H)");
    }
    for (const MatrixUse& u : uses) order_after(u, stream);
    const auto* w = static_cast<const float*>(weights.data());
    if (any.backend == Backend::Cpu)
      return moe_experts_cpu(r, mats, w, static_cast<uint32_t>(T), static_cast<uint32_t>(k), H, x.data(), xt, cfg,
                             out.data());
#if MOEOFFLOAD_WITH_CUDA
    cuda_check(moe_experts_cuda(r, mats, w, static_cast<uint32_t>(T), static_cast<uint32_t>(k), H, x.data(), xt, cfg,
                                scratch_ptr, out.data(), reinterpret_cast<cudaStream_t>(stream)),
               "moe_experts kernels");
#else
    (void)scratch_ptr;
    no_cuda();
#endif
  }, nb::arg("handle"), nb::arg("gate_up_ids"), nb::arg("gate_up_matrix"), nb::arg("down_ids"),
     nb::arg("down_matrix"), nb::arg("x"), nb::arg("routing").noconvert(), nb::arg("weights"), nb::arg("act"), nb::arg("layout"),
     nb::arg("alpha"), nb::arg("limit"), nb::arg("gate_up_bias").none(), nb::arg("down_bias").none(), nb::arg("out").noconvert(),
     nb::arg("scratch").none().noconvert(), nb::arg("stream") = 0,
     "One MoE layer's routed experts: out[t] = sum_j weights[t, j] * expert_{routing[t, j]}(x[t]), expert e's "
     "matrices at (handle, gate_up_ids[e], gate_up_matrix) and (handle, down_ids[e], down_matrix); routing on the "
     "host, the rest where the experts are.");

  m.def("szp_decode_matrix", [](int64_t handle, uint32_t expert, uint32_t index, Array out, uintptr_t stream) {
    std::shared_ptr<MatrixSource> src = find_source(handle);
    nb::gil_scoped_release release;
    MatrixUse u = src->use(expert, index);
    check_device(u, out, "out");
    const SzpView& v = u.matrix.view;
    if (out.nbytes() != v.numel * static_cast<uint64_t>(dtype_size(v.dtype)) || dtype_of(out, "out") != v.dtype)
      throw Error(ErrorKind::Shape, "out must hold the matrix's values in its stored dtype");
    order_after(u, stream);
    if (u.backend == Backend::Cpu) return szp_decode_cpu(u.matrix.buf, v, out.data());
#if MOEOFFLOAD_WITH_CUDA
    cuda_check(szp_decode_cuda(v, u.matrix.buf, out.data(), reinterpret_cast<cudaStream_t>(stream)), "szp decode");
#else
    no_cuda();
#endif
  }, nb::arg("handle"), nb::arg("expert"), nb::arg("matrix"), nb::arg("out").noconvert(), nb::arg("stream") = 0);

  nb::class_<HostMatrices>(m, "HostMatrices")
      .def(nb::new_([] { return std::make_shared<HostMatrices>(); }))
      .def("add", [](HostMatrices& h, HostBytes b) {
        nb::gil_scoped_release release;
        return h.add(b.data(), b.shape(0));
      }, nb::arg("buf"))
      .def("remove", &HostMatrices::remove, nb::arg("expert"), nb::call_guard<nb::gil_scoped_release>())
      .def("register", [](HostMatrices& h) { return register_source(h.shared_from_this()); });

  nb::class_<Runtime>(m, "Runtime")
      .def(nb::new_([](const std::string& backend, uint32_t layers, uint32_t experts, int streams) {
        return std::make_shared<Runtime>(parse_backend(backend), layers, experts, streams);
      }), nb::arg("backend"), nb::arg("num_layers"), nb::arg("experts_per_layer"), nb::arg("num_streams") = 2)
      .def_prop_ro("store", [](Runtime& r) -> ExpertStore& { return r.store(); }, nb::rv_policy::reference_internal)
      .def_prop_ro("pool", [](Runtime& r) -> PinnedPool& { return r.pool(); }, nb::rv_policy::reference_internal)
      .def_prop_ro("engine", [](Runtime& r) -> TransferEngine& { return r.engine(); }, nb::rv_policy::reference_internal)
      .def_prop_ro("cache", [](Runtime& r) -> DeviceCache& { return r.cache(); }, nb::rv_policy::reference_internal)
      .def("start", [](Runtime& r, uint64_t budget, const std::string& policy) {
        r.start(budget, parse_eviction_policy(policy));
      }, nb::arg("budget"), nb::arg("policy"))
      .def_prop_ro("handle", &Runtime::handle)
      .def_prop_ro("backend", [](const Runtime& r) { return std::string(backend_name(r.backend())); })
      .def_prop_ro("closed", &Runtime::closed)
      .def("close", &Runtime::close, nb::call_guard<nb::gil_scoped_release>());
}
