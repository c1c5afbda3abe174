// Bindings of the szpe codec (szpe.h): argument checks, GIL release, nothing else.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "arrays.h"
#include "moeoffload/errors.h"
#include "moeoffload/szpe.h"

#include "moeoffload/szp_cuda.h"   // declarations only: without CUDA, cuda_call never instantiates a launch
#include "moeoffload/szpe_cuda.h"

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

// The device arguments of a CUDA decode of the buffer `e` was parsed from.
void check_device_copy(const DeviceBytes& device_buf, const HostBytes& host_buf, const DeviceInt& failed) {
  if (device_buf.shape(0) != host_buf.shape(0))
    throw Error(ErrorKind::Shape, "device buffer size differs from the host buffer");
  if (failed.shape(0) != 1) throw Error(ErrorKind::Shape, "failed must hold one int32");
}

void check_szp_size(const DeviceBytesOut& szp, const SzpeView& e) {
  if (szp.shape(0) != e.as_szp.total_bytes)
    throw Error(ErrorKind::Shape, "the szp output holds " + std::to_string(szp.shape(0)) +
                                      " bytes, the buffer transcodes to " + std::to_string(e.as_szp.total_bytes));
}

// Runs launch(stream) (the GIL released), which returns a cudaError_t; a named error if it fails or if
// this build has no CUDA. launch is a generic lambda: a build without CUDA never instantiates its body,
// so the kernels it names need not exist there.
template <typename Launch>
void cuda_call(const char* what, uintptr_t stream, Launch&& launch) {
#if MOEOFFLOAD_WITH_CUDA
  int err;
  {
    nb::gil_scoped_release release;
    err = launch(reinterpret_cast<cudaStream_t>(stream));
  }
  if (err) throw Error(ErrorKind::Cuda, std::string(what) + " failed with cudaError " + std::to_string(err));
#else
  (void)stream, (void)launch;
  throw Error(ErrorKind::Cuda, std::string(what) + ": moeoffload was built without CUDA; rebuild with MOEOFFLOAD_CUDA=ON");
#endif
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
      "Entropy-code an szp buffer's quantised values (rANS streams of stream_segments rows; 0: about 65536 values a stream).");

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
        check_device_copy(device_buf, host_buf, failed);
        check_out(out, e.szp);
        check_szp_size(szp_scratch, e);
        cuda_call("szpe CUDA transcode and decode", stream, [&](auto s) {
          const int err = szpe_to_szp_cuda(e, device_buf.data(), szp_scratch.data(), failed.data(), s);
          return err ? err : szp_decode_cuda(e.as_szp, szp_scratch.data(), out.data(), s);
        });
      },
      nb::arg("host_buf"), nb::arg("device_buf"), nb::arg("szp_scratch").noconvert(), nb::arg("failed").noconvert(), nb::arg("out").noconvert(),
      nb::arg("stream"),
      "Transcode a device copy of a (validated) szpe buffer into szp_scratch (the szp buffer, byte for byte: the "
      "runtime's arrival step) and decode that into out, on the given CUDA stream. failed[0] becomes nonzero when a "
      "stream is corrupt (read it after the stream).");

  m.def(
      "szpe_to_szp_cuda",
      [](std::vector<HostBytes> host_bufs, std::vector<DeviceBytes> device_bufs, std::vector<DeviceBytesOut> szp_outs,
         DeviceInt failed, uintptr_t stream) {
        if (device_bufs.size() != host_bufs.size() || szp_outs.size() != host_bufs.size())
          throw Error(ErrorKind::Shape, "szpe_to_szp_cuda: " + std::to_string(host_bufs.size()) + " host buffers, " +
                                            std::to_string(device_bufs.size()) + " device copies and " +
                                            std::to_string(szp_outs.size()) + " outputs");
        std::vector<SzpeTranscode> jobs;
        for (size_t i = 0; i < host_bufs.size(); ++i) {
          const SzpeView e = parse_released(host_bufs[i], false);
          check_device_copy(device_bufs[i], host_bufs[i], failed);
          check_szp_size(szp_outs[i], e);
          jobs.push_back(SzpeTranscode{e, device_bufs[i].data(), szp_outs[i].data()});
        }
        cuda_call("szpe CUDA transcode", stream, [&](auto s) {
          return szpe_to_szp_cuda(jobs.data(), static_cast<int>(jobs.size()), failed.data(), s);
        });
      },
      nb::arg("host_bufs"), nb::arg("device_bufs"), nb::arg("szp_outs").noconvert(), nb::arg("failed").noconvert(),
      nb::arg("stream"),
      "Transcode device copies of (validated) szpe buffers into szp_outs, their streams side by side (one launch for "
      "up to four: the runtime's arrival step of one expert): each the szp buffer it was made from, byte for byte. "
      "failed[0] becomes nonzero when a stream is corrupt.");

  m.def(
      "szpe_decode_values_cuda",
      [](HostBytes host_buf, DeviceBytes device_buf, DeviceInt failed, DeviceArray out, uintptr_t stream) {
        const SzpeView e = parse_released(host_buf, false);
        check_device_copy(device_buf, host_buf, failed);
        check_out(out, e.szp);
        cuda_call("szpe CUDA decode", stream, [&](auto s) {
          return szpe_decode_values_cuda(e, device_buf.data(), out.data(), failed.data(), s);
        });
      },
      nb::arg("host_buf"), nb::arg("device_buf"), nb::arg("failed").noconvert(), nb::arg("out").noconvert(),
      nb::arg("stream"),
      "Decode a device copy of a (validated) szpe buffer straight into out (its values, bit for bit the CPU "
      "decoder's), on the given CUDA stream. failed[0] becomes nonzero when a stream is corrupt (read it after the "
      "stream).");
}
