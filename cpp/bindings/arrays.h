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

// Error(Shape) unless nbytes is what the buffer of view v decodes to.
inline void check_out_size(size_t nbytes, const SzpView& v) {
  if (nbytes != v.numel * static_cast<uint64_t>(dtype_size(v.dtype)))
    throw Error(ErrorKind::Shape, "output holds " + std::to_string(nbytes) + " bytes, the buffer decodes to " +
                                      std::to_string(v.numel) + " " + dtype_name(v.dtype) + " values");
}

}  // namespace moeoffload::bindings
