// The nanobind module: argument checks and GIL handling only, no logic.
// Every call that does work releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "arrays.h"
#include "moeoffload/backend.h"
#include "moeoffload/cpu_isa.h"
#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szp.h"
#if MOEOFFLOAD_WITH_CUDA
#include "moeoffload/szp_cuda.h"
#endif

namespace nb = nanobind;
using namespace moeoffload;

void bind_runtime(nb::module_& m);  // runtime.cpp
void bind_kernels(nb::module_& m);  // kernels.cpp
void bind_szpe(nb::module_& m);     // szpe.cpp

using namespace moeoffload::bindings;

namespace {

DType to_dtype(int code) {
  if (!dtype_is_valid(static_cast<uint32_t>(code)))
    throw Error(ErrorKind::UnsupportedDtype, "unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

nb::dict view_dict(const SzpView& v) {
  nb::dict d;
  d["dtype"] = static_cast<int>(v.dtype);
  nb::list shape;
  for (uint32_t i = 0; i < v.ndim; ++i) shape.append(v.shape[i]);
  d["shape"] = nb::tuple(shape);
  d["eb"] = v.eb;
  d["step"] = v.step;
  d["numel"] = v.numel;
  d["segment_len"] = v.segment_len;
  d["n_segments"] = v.n_segments;
  d["n_exceptions"] = v.n_exceptions;
  d["payload_bytes"] = v.payload_bytes;
  d["total_bytes"] = v.total_bytes;
  return d;
}

SzpView parse_released(const HostBytes& buf, bool verify) {
  nb::gil_scoped_release release;
  return szp_parse(buf.data(), buf.shape(0), verify);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "moeoffload native core (torch-free); use the moeoffload package, not this module";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      nb::object cls = nb::module_::import_("moeoffload.errors").attr(e.python_name());
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def("backend_info", [] {
    BackendInfo info;
    {
      nb::gil_scoped_release release;
      info = query_backend();
    }
    nb::dict d;
    d["built_with_cuda"] = info.built_with_cuda;
    d["gpu_available"] = info.gpu_available;
    d["device_count"] = info.device_count;
    d["device_name"] = info.device_name;
    d["compute_capability"] = nb::make_tuple(info.compute_capability_major, info.compute_capability_minor);
    d["reason"] = info.reason;
    d["cpu_isa"] = cpu_isa_name(cpu_isa());
    d["cpu_isa_supported"] = cpu_isa_name(cpu_isa_supported());
    return d;
  });

  m.def("num_threads", &num_threads);
  m.def("set_num_threads", &set_num_threads, nb::arg("n"));
  m.def("stop_threads", &stop_threads, nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "szp_encode",
      [](HostArray x, int dtype_code, std::vector<uint64_t> shape, double eb, uint64_t segment_len) {
        DType t = to_dtype(dtype_code);
        uint64_t numel = 1;
        for (uint64_t d : shape) numel *= d;
        if (x.nbytes() != numel * static_cast<uint64_t>(dtype_size(t)))
          throw Error(ErrorKind::Shape, "input holds " + std::to_string(x.nbytes()) + " bytes, shape and dtype need " +
                                            std::to_string(numel * dtype_size(t)));
        auto* result = new SzpEncodeResult();
        try {
          nb::gil_scoped_release release;
          *result = szp_encode(x.data(), t, shape, eb, segment_len);
        } catch (...) {
          delete result;
          throw;
        }
        nb::capsule owner(result, [](void* p) noexcept { delete static_cast<SzpEncodeResult*>(p); });
        size_t n = result->bytes.size();
        return nb::make_tuple(nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(result->bytes.data(), {n}, owner),
                              result->n_exceptions);
      },
      nb::arg("x"), nb::arg("dtype"), nb::arg("shape"), nb::arg("eb"), nb::arg("segment_len") = 0,
      "Encode raw values (fp32, or bf16/fp16 bits) into an szp buffer. Returns (uint8 array, n_exceptions).");

  m.def(
      "szp_inspect", [](HostBytes buf, bool verify) { return view_dict(parse_released(buf, verify)); },
      nb::arg("buf"), nb::arg("verify_checksum") = true, "Validate a buffer and return its header as a dict.");

  m.def(
      "szp_width_histogram",
      [](HostBytes buf) {
        SzpView v = parse_released(buf, false);
        std::vector<uint64_t> hist(kSzpMaxWidth + 1, 0);
        nb::gil_scoped_release release;
        szp_width_histogram(buf.data(), v, hist.data());
        return hist;
      },
      nb::arg("buf"), "Blocks of each width 0..25 in a buffer.");

  m.def(
      "szp_quantised",
      [](HostBytes buf) {
        const SzpView v = parse_released(buf, true);
        auto* q = new std::vector<int32_t>(v.numel);
        {
          nb::gil_scoped_release release;
          for (uint64_t s = 0; s < v.n_segments; ++s) szp_segment_q(buf.data(), v, s, q->data() + s * v.segment_len);
        }
        nb::capsule owner(q, [](void* p) noexcept { delete static_cast<std::vector<int32_t>*>(p); });
        return nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(q->data(), {q->size()}, owner);
      },
      nb::arg("buf"), "The quantised values q of every element (exceptions read 0), int32.");

  m.def(
      "szp_decode",
      [](HostBytes buf, HostArray out, bool verify) {
        SzpView v = parse_released(buf, verify);
        check_out(out, v);
        nb::gil_scoped_release release;
        szp_decode_cpu(buf.data(), v, out.data());
      },
      nb::arg("buf"), nb::arg("out").noconvert(), nb::arg("verify_checksum") = true,
      "Decode into a host array of the stored dtype (CPU, multithreaded).");

  m.def(
      "szp_decode_cuda",
      [](HostBytes host_buf, DeviceBytes device_buf, DeviceArray out, uintptr_t stream) {
        SzpView v = parse_released(host_buf, false);
        if (device_buf.shape(0) != host_buf.shape(0))
          throw Error(ErrorKind::Shape, "device buffer size differs from the host buffer");
        check_out(out, v);
#if MOEOFFLOAD_WITH_CUDA
        int err;
        {
          nb::gil_scoped_release release;
          err = szp_decode_cuda(v, device_buf.data(), out.data(), reinterpret_cast<cudaStream_t>(stream));
        }
        if (err) throw Error(ErrorKind::Cuda, "szp CUDA decode failed with cudaError " + std::to_string(err));
#else
        (void)stream;
        throw Error(ErrorKind::Cuda, "moeoffload was built without CUDA; rebuild with MOEOFFLOAD_CUDA=ON");
#endif
      },
      nb::arg("host_buf"), nb::arg("device_buf"), nb::arg("out").noconvert(), nb::arg("stream"),
      "Decode a device copy of a (validated) host buffer on the given CUDA stream.");

  bind_runtime(m);
  bind_kernels(m);
  bind_szpe(m);

  m.def("crc32", [](HostBytes buf) {
    nb::gil_scoped_release release;
    return crc32(buf.data(), buf.shape(0));
  });
}
