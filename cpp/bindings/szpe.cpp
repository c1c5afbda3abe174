// Bindings of the szpe codec (szpe.h): argument checks, GIL release, nothing else.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>
#include <vector>

#include "arrays.h"
#include "moeoffload/errors.h"
#include "moeoffload/szpe.h"

#if MOEOFFLOAD_WITH_CUDA
#include "moeoffload/szp_cuda.h"
#include "moeoffload/szpe_cuda.h"
#endif

namespace nb = nanobind;
using namespace moeoffload;

namespace {

using namespace moeoffload::bindings;
using DeviceBytesOut = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cuda>;
using DeviceInt = nb::ndarray<int32_t, nb::ndim<1>, nb::c_contig, nb::device::cuda>;

nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> owned(std::vector<uint8_t>* bytes) {
  nb::capsule owner(bytes, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
  return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(bytes->data(), {bytes->size()}, owner);
}

template <typename Fn>
nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> make_bytes(Fn&& fn) {
  auto* bytes = new std::vector<uint8_t>();
  try {
    nb::gil_scoped_release release;
    *bytes = fn();
  } catch (...) {
    delete bytes;
    throw;
  }
  return owned(bytes);
}

SzpeView parse_released(const HostBytes& buf, bool verify) {
  nb::gil_scoped_release release;
  return szpe_parse(buf.data(), buf.shape(0), verify);
}

}  // namespace

void bind_szpe(nb::module_& m) {
  m.def(
      "szpe_from_szp",
      [](HostBytes szp, uint64_t stream_segments) {
        SzpView v;
        {
          nb::gil_scoped_release release;
          v = szp_parse(szp.data(), szp.shape(0), true);
        }
        return make_bytes([&] { return szpe_from_szp(szp.data(), v, stream_segments); });
      },
      nb::arg("szp"), nb::arg("stream_segments") = 0,
      "Entropy-code an szp buffer's quantised values (rANS streams of stream_segments rows; 0: ~16K values).");

  m.def(
      "szpe_inspect",
      [](HostBytes buf, bool verify) {
        const SzpeView e = parse_released(buf, verify);
        nb::dict d;
        nb::list shape;
        for (uint32_t i = 0; i < e.szp.ndim; ++i) shape.append(e.szp.shape[i]);
        d["dtype"] = static_cast<int>(e.szp.dtype);
        d["shape"] = nb::tuple(shape);
        d["eb"] = e.szp.eb;
        d["step"] = e.szp.step;
        d["numel"] = e.szp.numel;
        d["segment_len"] = e.szp.segment_len;
        d["n_exceptions"] = e.szp.n_exceptions;
        d["alphabet"] = e.alphabet;
        d["escape_bytes"] = e.escape_bytes;
        d["n_streams"] = e.n_streams;
        d["stream_segments"] = e.stream_segments;
        d["n_escapes"] = e.n_escapes;
        d["payload_bytes"] = e.payload_bytes;
        d["total_bytes"] = e.total_bytes;
        d["szp_total_bytes"] = e.as_szp.total_bytes;  // the szp buffer it transcodes to
        return d;
      },
      nb::arg("buf"), nb::arg("verify_checksum") = true, "Validate an szpe buffer and return its header as a dict.");

  m.def(
      "szpe_decode",
      [](HostBytes buf, HostArray out, bool verify) {
        const SzpeView e = parse_released(buf, verify);
        check_out(out, e.szp);
        nb::gil_scoped_release release;
        szpe_decode_cpu(buf.data(), e, out.data());
      },
      nb::arg("buf"), nb::arg("out").noconvert(), nb::arg("verify_checksum") = true,
      "Decode into a host array of the stored dtype (CPU, multithreaded): szp's values bit for bit.");

  m.def(
      "szpe_to_szp",
      [](HostBytes buf, bool verify) {
        const SzpeView e = parse_released(buf, verify);
        return make_bytes([&] { return szpe_to_szp(buf.data(), e); });
      },
      nb::arg("buf"), nb::arg("verify_checksum") = true, "The szp buffer an szpe buffer was made from.");

  m.def(
      "szpe_decode_cuda",
      [](HostBytes host_buf, DeviceBytes device_buf, DeviceBytesOut szp_scratch, DeviceInt failed, DeviceArray out,
         uintptr_t stream) {
        const SzpeView e = parse_released(host_buf, false);
        if (device_buf.shape(0) != host_buf.shape(0))
          throw Error(ErrorKind::Shape, "device buffer size differs from the host buffer");
        if (szp_scratch.shape(0) != e.as_szp.total_bytes)
          throw Error(ErrorKind::Shape, "szp scratch holds " + std::to_string(szp_scratch.shape(0)) +
                                            " bytes, the buffer transcodes to " + std::to_string(e.as_szp.total_bytes));
        if (failed.shape(0) != 1) throw Error(ErrorKind::Shape, "failed must hold one int32");
        check_out(out, e.szp);
#if MOEOFFLOAD_WITH_CUDA
        int err;
        {
          nb::gil_scoped_release release;
          auto s = reinterpret_cast<cudaStream_t>(stream);
          err = szpe_to_szp_cuda(e, device_buf.data(), szp_scratch.data(), failed.data(), s);
          if (!err) err = szp_decode_cuda(e.as_szp, szp_scratch.data(), out.data(), s);
        }
        if (err) throw Error(ErrorKind::Cuda, "szpe CUDA decode failed with cudaError " + std::to_string(err));
#else
        (void)stream;
        throw Error(ErrorKind::Cuda, "moeoffload was built without CUDA; rebuild with MOEOFFLOAD_CUDA=ON");
#endif
      },
      nb::arg("host_buf"), nb::arg("device_buf"), nb::arg("szp_scratch").noconvert(), nb::arg("failed").noconvert(), nb::arg("out").noconvert(),
      nb::arg("stream"),
      "Transcode a device copy of a (validated) szpe buffer into szp_scratch (the szp buffer, byte for byte) and "
      "decode that into out, on the given CUDA stream. failed[0] becomes nonzero when a stream is corrupt (read it "
      "after the stream).");
}
