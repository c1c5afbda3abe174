// szpe on the GPU, a warp a stream: lane j holds rANS state j, which codes value j of every szp
// block (rans.h), so the warp decodes a 32-value block in one step. Per block each active lane looks
// up its symbol in the CTA's shared table, the lanes whose state fell below 2^16 read their word in
// lane order (a ballot, and a popcount of the lanes below), and escaped lanes take their stored value
// the same way. Then a sink uses the block's 32 q values:
//   szpe_to_szp_cuda (SzpSink): the transcode into fixed-width szp, the runtime's arrival step when
//     host memory and the bus carry szpe and the device cache holds szp. The block's width from a
//     warp min/max, its w words each an OR-reduction of the lanes' fields; lane 0 writes the widths
//     and the segment's offsets, and szp's exception table entries of its exceptions.
//   szpe_decode_values_cuda (ValueSink): values, 32 consecutive ones a block (coalesced), then the
//     stream's exceptions patched by the same warp.
// The CPU decoders (cpp/kernels/szpe_decode.cpp) are the reference: the same streams in the same
// order, checked the same way (a stream must use up its bytes and escapes and end in the encoder's
// initial states); tests/test_szpe.py compares the two bit for bit. A corrupt stream makes its warp
// stop and set *failed; it never reads or writes outside its own ranges.
#include <cuda_runtime.h>

#include <algorithm>

#include "launch.cuh"
#include "moeoffload/szpe_cuda.h"
#include "../cpp/codec/szp_layout.h"
#include "moeoffload/szp_block.h"
#include "moeoffload/szpe.h"
#include "moeoffload/szpe_stream.h"
#include "warp_scan.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the szpe kernels use warp reductions (__reduce_*_sync): sm_80 or newer"
#endif

namespace moeoffload {

namespace {



constexpr int kWarps = 8;  // streams a CTA; they share one 40 KiB decoding table
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

using szpe_stream::load;
using szpe_stream::store;

// The decoding table, by all threads of the CTA: the cumulative frequencies by warp 0 (8 symbols a
// lane and a warp scan), then each slot finds its symbol by binary search, so the work is even however
// skewed the frequencies. The same table as szpe_stream::build_table (parse checked the sum is 2^13).
__device__ void build_table(const uint8_t* in, const SzpeView& e, RansTable& t, uint32_t* cum) {
  static_assert(kSzpeMaxAlphabet == 8 * 32, "warp 0 sums 8 symbols a lane");
  if (threadIdx.x < 32) {
    const uint32_t lane = threadIdx.x;
    uint32_t f[8], sum = 0;
#pragma unroll
    for (uint32_t i = 0; i < 8; ++i) {
      const uint32_t a = 8 * lane + i;
      f[i] = a < e.alphabet ? szpe_stream::freq_of(in, e, a) : 0;
      sum += f[i];
    }
    uint32_t c = warp_inclusive_sum(sum, lane) - sum;
#pragma unroll
    for (uint32_t i = 0; i < 8; ++i) {
      cum[8 * lane + i] = c;
      c += f[i];
    }
    if (lane == 31) cum[kSzpeMaxAlphabet] = c;
  }
  __syncthreads();
  for (uint32_t slot = threadIdx.x; slot < (1u << kRansScaleBits); slot += blockDim.x) {
    uint32_t lo = 0, hi = e.alphabet;  // cum[lo] <= slot < cum[hi]
    while (hi - lo > 1) {
      const uint32_t mid = (lo + hi) / 2;
      if (cum[mid] <= slot) lo = mid;
      else hi = mid;
    }
    t.step[slot] = (cum[lo + 1] - cum[lo]) | ((slot - cum[lo]) << 16);
    t.symbol[slot] = static_cast<uint8_t>(lo);
  }
  __syncthreads();
}

// What the streams of a transcode leave to block 0 of its kernel: the szp header and shape, the offset
// tables' last entries, the CRC.
struct SzpFrame {
  uint8_t bytes[kSzpHeaderBytes + 8 * kSzpMaxNdim];
  uint32_t len;
};
struct NoFrame {};

__device__ void write_frame(const SzpeView&, const NoFrame&, void*) {}
__device__ void write_frame(const SzpeView& e, const SzpFrame& f, uint8_t* out) {
  for (uint32_t i = threadIdx.x; i < f.len; i += blockDim.x) out[i] = f.bytes[i];
  if (threadIdx.x == 0) szpe_stream::write_szp_tail(e, out);
}

// Straight to values of dtype T.
template <DType T>
struct ValueSink {
  using O = typename Stored<T>::type;
  const uint8_t* in;
  O* out;
  O* seg = nullptr;  // the current segment's first value

  __device__ void begin_stream(const szpe_stream::StreamBounds&) {}
  __device__ bool begin_segment(const SzpeView& e, uint64_t g, uint64_t /*len*/, uint32_t /*lane*/) {
    seg = out + g * e.szp.segment_len;
    return true;
  }
  __device__ bool block(const SzpeView& e, uint64_t k0, uint32_t cnt, int32_t q, uint32_t lane) {
    if (lane < cnt) seg[k0 + lane] = szp_value<T>(q, e.szp.step);
    return true;
  }
  __device__ bool end_stream(const SzpeView& e, const szpe_stream::StreamSpan& sp, const szpe_stream::StreamBounds& b,
                             uint32_t lane) {
    __syncwarp();  // the values before the exceptions that replace some of them
    O* dst = out + sp.first_value;
    for (uint64_t x = b.exception + lane; x < b.exception_end; x += 32)  // parse checked the positions
      dst[load<uint32_t>(in + e.exc_pos_at + 4 * x)] = static_cast<O>(szpe_stream::exception_raw(in, e, x));
    return true;
  }
};

// Into the szp buffer the szpe was made from (its header, last offsets and CRC are the kernel's thread
// 0's): the stream's segments, their widths and blocks, and their entries of szp's segment offset and
// exception tables. Nothing outside the stream's szp range and its table entries is written.
struct SzpSink {
  const uint8_t* in;
  uint8_t* out;
  uint64_t at = 0, stop = 0;  // the next byte of the stream's szp range, and its end
  uint64_t exc = 0, exc_end = 0;
  uint64_t seg_start = 0;  // the current segment's first value, in the stream
  uint8_t* widths = nullptr;

  __device__ void begin_stream(const szpe_stream::StreamBounds& b) {
    at = b.szp, stop = b.szp_end, exc = b.exception, exc_end = b.exception_end;
  }
  __device__ bool begin_segment(const SzpeView& e, uint64_t g, uint64_t len, uint32_t lane) {
    const SzpView& o = e.as_szp;
    if (lane == 0) store<uint64_t>(out + o.seg_offsets_at + 8 * g, at);
    if (e.szp.n_exceptions) {  // this segment's exceptions: few (a lane's work), in position order
      const uint64_t next =
          lane == 0 ? szpe_stream::write_segment_exceptions(in, e, out, g, seg_start, len, exc, exc_end) : exc;
      exc = __shfl_sync(kFull, next, 0);
    }
    const uint64_t nblocks = szp_blocks_in(len), widths_bytes = szp_widths_bytes(nblocks);
    if (stop < at || stop - at < widths_bytes) return false;
    widths = out + o.payload_at + at;
    if (lane < widths_bytes - nblocks) widths[nblocks + lane] = 0;  // the padding (under 4 bytes)
    at += widths_bytes;
    seg_start += len;  // the next segment's
    return true;
  }
  __device__ bool block(const SzpeView& e, uint64_t k0, uint32_t /*cnt*/, int32_t q, uint32_t lane) {
    const uint32_t w = szp_width_for(__reduce_min_sync(kFull, q), __reduce_max_sync(kFull, q));
    if (w > e.as_szp.max_width || stop - at < szp_block_bytes(w)) return false;
    if (lane == 0) widths[k0 / kSzpBlock] = static_cast<uint8_t>(w);
    if (!w) return true;
    // Field `lane` is bits [lane * w, lane * w + w) of the block (szp_block.h): its low part in word
    // `k`, the part that crosses a word boundary in word k + 1. Word j is the OR of the lanes' parts.
    const uint32_t field = static_cast<uint32_t>(q) & ((1u << w) - 1u);
    const uint32_t bit = lane * w, k = bit >> 5, shift = bit & 31u;
    const uint32_t low = field << shift, high = shift + w > 32u ? field >> (32u - shift) : 0u;
    uint32_t mine = 0;
    for (uint32_t j = 0; j < w; ++j) {
      const uint32_t word = __reduce_or_sync(kFull, (k == j ? low : 0u) | (k + 1 == j ? high : 0u));
      if (lane == j) mine = word;
    }
    if (lane < w) store<uint32_t>(out + e.as_szp.payload_at + at + 4 * lane, mine);
    at += szp_block_bytes(w);
    return true;
  }
  __device__ bool end_stream(const SzpeView&, const szpe_stream::StreamSpan&, const szpe_stream::StreamBounds&,
                             uint32_t) {
    return at == stop && exc == exc_end;
  }
};

// Stream s through the sink, the whole warp (every branch below is uniform across it). False when the
// stream is corrupt (the sink then stopped where it was).
template <class Sink>
__device__ bool decode_stream(const uint8_t* in, const SzpeView& e, const RansTable& t, uint64_t s, uint32_t lane,
                              Sink& sink) {
  const SzpView& v = e.szp;
  const szpe_stream::StreamSpan sp = szpe_stream::span_of(e, s);
  const szpe_stream::StreamBounds b = szpe_stream::bounds_of(in, e, s);
  const uint8_t* p = in + e.payload_at + b.bytes;  // parse checked the stream holds its states
  const uint8_t* const end = in + e.payload_at + b.bytes_end;
  uint32_t x = szpe_stream::initial_state(p, lane);
  p += 4 * kRansWays;
  uint64_t esc = b.escape;
  const uint32_t escape = e.alphabet - 1, below = (1u << lane) - 1u;
  sink.begin_stream(b);
  for (uint64_t g = sp.first_segment; g < sp.end_segment; ++g) {
    const uint64_t len = min(v.segment_len, v.numel - g * v.segment_len);
    if (!sink.begin_segment(e, g, len, lane)) return false;
    for (uint64_t k0 = 0; k0 < len; k0 += kSzpBlock) {
      const uint32_t cnt = static_cast<uint32_t>(min(static_cast<uint64_t>(kSzpBlock), len - k0));
      const bool active = lane < cnt;
      uint32_t z = active ? rans_get(x, t) : 0u;
      const bool reads = active && x < kRansLow;
      const uint32_t readers = __ballot_sync(kFull, reads);
      const uint32_t words = __popc(readers);
      if (end - p < static_cast<int64_t>(2 * words)) return false;
      if (reads) x = (x << 16) | load<uint16_t>(p + 2 * __popc(readers & below));
      p += 2 * words;
      const bool escaped = active && z == escape;
      const uint32_t escapers = __ballot_sync(kFull, escaped);
      if (escapers) {  // their zigzag values are the next ones stored, in lane order
        const uint32_t n = __popc(escapers);
        if (b.escape_end - esc < n) return false;
        if (escaped) z = szpe_stream::escape_at(in, e, esc + __popc(escapers & below));
        esc += n;
      }
      if (!sink.block(e, k0, cnt, active ? szpe_stream::unzigzag(z) : 0, lane)) return false;
    }
  }
  const bool clean = p == end && esc == b.escape_end && x == kRansLow;
  return __all_sync(kFull, clean) && sink.end_stream(e, sp, b, lane);
}

// One tensor of a launch: its device copy, view, sink (its output) and frame, and the grid's first
// block of its streams.
template <class Sink, class Frame>
struct Part {
  const uint8_t* in;
  SzpeView e;
  Sink sink;
  Frame frame;
  uint32_t first_block;
};

// The tensors of one launch: their blocks follow one another in the grid, so their streams decode side
// by side (an expert's arrival takes about its longest stream, not the sum of its matrices').
template <class Sink, class Frame, int N>
struct Batch {
  Part<Sink, Frame> part[N];
  uint32_t n;
};

// A stream a warp, each warp with its own copy of the sink (its state).
template <class Sink, class Frame, int N>
__global__ void __launch_bounds__(kThreads) szpe_kernel(const __grid_constant__ Batch<Sink, Frame, N> batch, int* failed) {
  uint32_t j = 0;  // this block's tensor (uniform across the block)
  while (j + 1 < batch.n && blockIdx.x >= batch.part[j + 1].first_block) ++j;
  const Part<Sink, Frame>& part = batch.part[j];
  const uint8_t* __restrict__ in = part.in;
  const uint32_t block = blockIdx.x - part.first_block;
  __shared__ RansTable table;
  __shared__ uint32_t cum[kSzpeMaxAlphabet + 1];
  build_table(in, part.e, table, cum);
  if (block == 0) write_frame(part.e, part.frame, part.sink.out);
  const uint64_t s = static_cast<uint64_t>(block) * kWarps + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x & 31u;
  if (s >= part.e.n_streams) return;  // whole warps
  Sink sink = part.sink;
  if (!decode_stream(in, part.e, table, s, lane, sink) && lane == 0) atomicExch(failed, 1);
}

// The grid of a decode of e: a warp a stream, at least one block (block 0 writes the frame).
inline uint64_t grid_blocks(const SzpeView& e) { return e.n_streams ? (e.n_streams + kWarps - 1) / kWarps : 1; }

// The frame of the szp buffer e transcodes to, as its kernel's block 0 writes it.
inline SzpFrame szp_frame(const SzpeView& e) {
  SzpFrame frame{};
  szp_layout::write_header(e.as_szp, e.szp.shape, frame.bytes);
  frame.len = static_cast<uint32_t>(kSzpHeaderBytes + 8ull * e.szp.ndim);
  return frame;
}

// One launch of the first batch.n parts (their first_block is filled in here).
template <class Sink, class Frame, int N>
int launch(Batch<Sink, Frame, N>& batch, int* device_failed, cudaStream_t stream) {
  static_assert(sizeof(batch) <= 4096, "kernel parameters are limited to 4 KiB");
  uint64_t blocks = 0;
  for (uint32_t j = 0; j < batch.n; ++j) {
    if (misaligned8(batch.part[j].in) || misaligned8(batch.part[j].sink.out)) return static_cast<int>(cudaErrorMisalignedAddress);
    batch.part[j].first_block = static_cast<uint32_t>(blocks);
    blocks += grid_blocks(batch.part[j].e);
    if (blocks > 0x7FFFFFFFull) return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  if (blocks == 0) return static_cast<int>(cudaSuccess);
  return launch_kernel(szpe_kernel<Sink, Frame, N>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                       batch, device_failed);
}

// A decode of one tensor to values.
template <class Sink>
int launch_one(const SzpeView& e, const uint8_t* device_in, const Sink& sink, int* device_failed,
               cudaStream_t stream) {
  Batch<Sink, NoFrame, 1> batch{};
  batch.part[0].in = device_in;
  batch.part[0].e = e;
  batch.part[0].sink = sink;
  batch.n = 1;
  return launch(batch, device_failed, stream);
}

}  // namespace

int szpe_to_szp_cuda(const SzpeTranscode* jobs, int n, int* device_failed, cudaStream_t stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  for (int first = 0; first < n; first += kSzpeBatchMax) {
    Batch<SzpSink, SzpFrame, kSzpeBatchMax> batch{};
    batch.n = static_cast<uint32_t>(std::min(n - first, kSzpeBatchMax));
    for (uint32_t j = 0; j < batch.n; ++j) {
      const SzpeTranscode& job = jobs[first + j];
      batch.part[j].in = job.device_in;
      batch.part[j].e = job.view;
      batch.part[j].sink = SzpSink{job.device_in, job.device_out};
      batch.part[j].frame = szp_frame(job.view);
    }
    const int err = launch(batch, device_failed, stream);
    if (err != static_cast<int>(cudaSuccess)) return err;
  }
  return static_cast<int>(cudaSuccess);
}

int szpe_to_szp_cuda(const SzpeView& e, const uint8_t* device_in, uint8_t* device_out, int* device_failed,
                     cudaStream_t stream) {
  const SzpeTranscode job{e, device_in, device_out};
  return szpe_to_szp_cuda(&job, 1, device_failed, stream);
}

int szpe_decode_values_cuda(const SzpeView& e, const uint8_t* device_in, void* device_out, int* device_failed,
                            cudaStream_t stream) {
  switch (e.szp.dtype) {
    case DType::F32:
      return launch_one(e, device_in, ValueSink<DType::F32>{device_in, static_cast<uint32_t*>(device_out)},
                        device_failed, stream);
    case DType::BF16:
      return launch_one(e, device_in, ValueSink<DType::BF16>{device_in, static_cast<uint16_t*>(device_out)},
                        device_failed, stream);
    case DType::F16:
      return launch_one(e, device_in, ValueSink<DType::F16>{device_in, static_cast<uint16_t*>(device_out)},
                        device_failed, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace moeoffload
