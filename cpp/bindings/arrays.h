// What the bindings take: the array types nanobind converts (host and device byte buffers and
// arrays) and the check that an output array holds what a buffer decodes to.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "moeoffload/errors.h"
#include "moeoffload/szp.h"

namespace moeoffload::bindings {

namespace nb = nanobind;

using HostBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using HostArray = nb::ndarray<nb::c_contig, nb::device::cpu>;
using DeviceBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cuda>;
using DeviceArray = nb::ndarray<nb::c_contig, nb::device::cuda>;

// Error(UnsupportedDtype) unless out has the buffer's stored dtype, Error(Shape) unless it holds what
// the buffer of view v decodes to.
template <typename Array>
void check_out(const Array& out, const SzpView& v) {
  const nb::dlpack::dtype d = out.dtype();
  const bool is_f16 = d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && d.bits == 16;
  const bool is_bf16 = d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16;
  if (v.dtype == DType::F32 ? d != nb::dtype<float>() : v.dtype == DType::BF16 ? !is_bf16 : !is_f16)
    throw Error(ErrorKind::UnsupportedDtype, std::string("output must be ") + dtype_name(v.dtype) +
                                                 ", the buffer's stored dtype");
  if (out.nbytes() != v.numel * static_cast<uint64_t>(dtype_size(v.dtype)))
    throw Error(ErrorKind::Shape, "output holds " + std::to_string(out.nbytes()) + " bytes, the buffer decodes to " +
                                      std::to_string(v.numel) + " " + dtype_name(v.dtype) + " values");
}

}  // namespace moeoffload::bindings
