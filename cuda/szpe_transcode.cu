// szpe -> szp on the GPU: the arrival step of a device cache that holds fixed-width szp while host
// memory and the bus carry szpe. One thread per stream runs szpe_stream::transcode, the function the
// CPU transcoder runs (and its tests check byte for byte against the szp encoder), which also writes
// its segments' part of szp's exception table; the 128 threads of a block share the decoding table in
// shared memory (40 KiB at 13-bit frequencies, built by all of them). Thread 0 writes the szp header
// (a kernel parameter), the last segment and exception offsets and the CRC.
#include <cuda_runtime.h>

#include "../cpp/codec/szp_layout.h"
#include "moeoffload/szpe_cuda.h"
#include "moeoffload/szpe_stream.h"

namespace moeoffload {

namespace {

constexpr int kThreads = 128;

struct Prefix {  // header and shape of the szp buffer
  uint8_t bytes[kSzpHeaderBytes + 8 * kSzpMaxNdim];
  uint32_t len;
};

__global__ void __launch_bounds__(kThreads)
    szpe_transcode_kernel(const uint8_t* in, SzpeView e, uint8_t* out, Prefix prefix, int* failed) {
  __shared__ RansTable table;
  szpe_stream::build_table(in, e, table, threadIdx.x, blockDim.x);
  __syncthreads();
  const uint64_t s = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const SzpView& o = e.as_szp;
  if (s == 0) {
    for (uint32_t i = 0; i < prefix.len; ++i) out[i] = prefix.bytes[i];
    if (e.szp.numel) szpe_stream::store<uint64_t>(out + o.seg_offsets_at + 8 * e.szp.n_segments, o.payload_bytes);
    if (e.szp.n_exceptions)
      szpe_stream::store<uint64_t>(out + o.exc_offsets_at + 8 * e.szp.n_segments, e.szp.n_exceptions);
    for (int i = 0; i < 4; ++i) out[o.total_bytes - 4 + i] = static_cast<uint8_t>(e.szp_crc >> (8 * i));
  }
  if (s < e.n_streams && !szpe_stream::transcode(in, e, table, s, out)) atomicExch(failed, 1);
}

}  // namespace

int szpe_to_szp_cuda(const SzpeView& e, const uint8_t* device_in, uint8_t* device_out, int* device_failed,
                     cudaStream_t stream) {
  if ((reinterpret_cast<uintptr_t>(device_in) | reinterpret_cast<uintptr_t>(device_out)) & 7)
    return cudaErrorMisalignedAddress;
  const SzpView& v = e.szp;
  const SzpView& o = e.as_szp;
  Prefix prefix{};
  szp_layout::write_header(o, v.shape, prefix.bytes);
  prefix.len = static_cast<uint32_t>(kSzpHeaderBytes + 8ull * v.ndim);
  const uint64_t blocks = e.n_streams ? (e.n_streams + kThreads - 1) / kThreads : 1;  // one writes the header
  szpe_transcode_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(device_in, e, device_out, prefix,
                                                                               device_failed);
  return cudaGetLastError();
}

}  // namespace moeoffload
