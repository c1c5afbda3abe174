// szpe encoder: an szp buffer's quantised values, rANS coded (szpe.h, docs/format.md).
//
// Two passes over the szp blocks: a histogram of the zigzag symbols picks the alphabet (the escape
// threshold) and the frequencies, then each stream is coded on its own (in parallel), backwards.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "moeoffload/errors.h"
#include "moeoffload/parallel.h"
#include "moeoffload/szpe.h"
#include "bytes.h"
#include "szp_layout.h"

namespace moeoffload {

namespace {

using bytes::load;
using bytes::store;

uint32_t zigzag(int32_t q) { return (static_cast<uint32_t>(q) << 1) ^ static_cast<uint32_t>(q >> 31); }

// The q values of stream s (szp segments s*G .. min(S, (s+1)*G)) into q.
void stream_q(const uint8_t* szp, const SzpView& v, uint64_t G, uint64_t s, std::vector<int32_t>& q) {
  const uint64_t first = s * G * v.segment_len;
  q.resize(std::min(v.numel, (s + 1) * G * v.segment_len) - first);
  for (uint64_t g = s * G; g < std::min(v.n_segments, (s + 1) * G); ++g)
    szp_segment_q(szp, v, g, q.data() + (g * v.segment_len - first));
}

// Frequencies summing to 2^bits, >= 1 for every symbol that occurs, moved one unit at a time to
// where the coded size (sum of count * log2(total / freq)) gains most.
std::vector<uint32_t> normalise(const std::vector<uint64_t>& counts, uint32_t bits) {
  const uint32_t total = 1u << bits;
  const uint64_t n = [&] {
    uint64_t t = 0;
    for (uint64_t c : counts) t += c;
    return t;
  }();
  std::vector<uint32_t> f(counts.size(), 0);
  if (n == 0) {
    f.back() = total;
    return f;
  }
  int64_t sum = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (!counts[i]) continue;
    f[i] = static_cast<uint32_t>(std::max<uint64_t>(1, counts[i] * total / n));
    sum += f[i];
  }
  while (sum != static_cast<int64_t>(total)) {
    size_t best = counts.size();
    double best_cost = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      if (!counts[i]) continue;
      double cost;  // change of the coded size, in bits
      if (sum < static_cast<int64_t>(total)) cost = -static_cast<double>(counts[i]) * std::log2((f[i] + 1.0) / f[i]);
      else if (f[i] > 1) cost = static_cast<double>(counts[i]) * std::log2(f[i] / (f[i] - 1.0));
      else continue;
      if (best == counts.size() || cost < best_cost) {
        best = i;
        best_cost = cost;
      }
    }
    if (sum < static_cast<int64_t>(total)) ++f[best], ++sum;
    else --f[best], --sum;
  }
  return f;
}

// Whether every escaped value (zigzag >= alphabet - 1, the largest zmax) fits a u16 as z - (alphabet - 1).
bool u16_escapes(uint32_t zmax, uint32_t alphabet) { return zmax < alphabet - 1 || zmax - (alphabet - 1) < 65536; }

// The alphabet A (2..256; 1 only for an empty tensor) whose estimated size is smallest: literal
// symbols 0..A-2 at their entropy, the rest escaped at their entropy + 16 bits (when every escaped
// value is below A - 1 + 2^16, `zmax` the largest) or 32, plus the table.
uint32_t choose_alphabet(const std::vector<uint64_t>& hist /* kSzpeMaxAlphabet + 1 bins, the last: >= 256 */,
                         uint32_t zmax) {
  uint64_t n = 0;
  for (uint64_t c : hist) n += c;
  if (n == 0) return 1;
  auto bits = [&](uint64_t c) { return c ? static_cast<double>(c) * std::log2(static_cast<double>(n) / c) : 0.0; };
  uint32_t best = 2;
  double best_cost = 0;
  double literal = 0;
  uint64_t escaped = n;
  for (uint32_t a = 2; a <= kSzpeMaxAlphabet; ++a) {
    literal += bits(hist[a - 2]);
    escaped -= hist[a - 2];
    const double escape_bits = u16_escapes(zmax, a) ? 16.0 : 32.0;
    const double cost = literal + bits(escaped) + escape_bits * escaped + 16.0 * a;
    if (a == 2 || cost < best_cost) {
      best = a;
      best_cost = cost;
    }
  }
  return best;
}

struct Stream {
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> escapes;
};

// A stream's values (whole segments of segment_len, the last maybe short), backwards: value i uses the
// state of its lane in its szp block, (i mod segment_len) mod 32.
void encode_stream(const std::vector<int32_t>& q, uint64_t segment_len, uint32_t alphabet,
                   const std::vector<uint32_t>& freq, const std::vector<uint32_t>& cum, Stream& out) {
  static_assert(kRansWays == kSzpBlock, "a state per lane of an szp block");
  const size_t n = q.size();
  std::vector<uint8_t> buf(2 * n + 4 * kRansWays + 8);  // at most one u16 a value
  uint8_t* const end = buf.data() + buf.size();
  uint8_t* ptr = end;
  uint32_t x[kRansWays];
  for (uint32_t& s : x) s = kRansLow;
  const uint32_t esc = alphabet - 1;
  for (size_t i = n; i-- > 0;) {
    const uint32_t z = zigzag(q[i]);
    const uint32_t sym = std::min(z, esc);
    rans_put(x[i % segment_len % kRansWays], ptr, cum[sym], freq[sym]);
    if (sym == esc) out.escapes.push_back(z);
  }
  std::reverse(out.escapes.begin(), out.escapes.end());  // the decoder reads them forwards
  for (uint32_t j = kRansWays; j-- > 0;) {
    ptr -= 4;
    memcpy(ptr, &x[j], 4);
  }
  out.bytes.assign(ptr, end);
}

}  // namespace

std::vector<uint8_t> szpe_from_szp(const uint8_t* szp, const SzpView& v, uint64_t stream_segments) {
  const uint64_t S = v.n_segments;
  if (stream_segments && stream_segments > std::max<uint64_t>(1, kSzpMaxSegment / v.segment_len))
    throw Error(ErrorKind::Shape, "a stream of " + std::to_string(stream_segments) + " segments of " +
                                      std::to_string(v.segment_len) + " values exceeds 2^24 values");
  const uint64_t G = stream_segments ? stream_segments : std::max<uint64_t>(1, kSzpeStreamValues / v.segment_len);
  const uint64_t NS = S ? (S - 1) / G + 1 : 0;

  // Pass 1: the symbol histogram (bins 0..255, then everything above) and the largest symbol.
  std::vector<std::vector<uint64_t>> part(NS);
  std::vector<uint32_t> part_max(NS, 0);
  parallel_for(NS, 1, [&](uint64_t s0, uint64_t s1) {
    std::vector<int32_t> q;
    for (uint64_t s = s0; s < s1; ++s) {
      part[s].assign(kSzpeMaxAlphabet + 1, 0);
      stream_q(szp, v, G, s, q);
      for (int32_t x : q) {
        const uint32_t z = zigzag(x);
        ++part[s][std::min<uint32_t>(z, kSzpeMaxAlphabet)];
        part_max[s] = std::max(part_max[s], z);
      }
    }
  });
  std::vector<uint64_t> hist(kSzpeMaxAlphabet + 1, 0);
  for (const auto& p : part)
    for (size_t i = 0; i < hist.size(); ++i) hist[i] += p[i];
  const uint32_t zmax = NS ? *std::max_element(part_max.begin(), part_max.end()) : 0;
  if (zmax > kSzpeMaxZigzag)  // q = -2^24 fits a 25-bit field, but szp's encoder never writes it
    throw Error(ErrorKind::CorruptData, "szp buffer holds a quantised value of -2^24, outside the range szp's "
                                        "encoder writes: re-create it from the original weights");
  const uint32_t A = choose_alphabet(hist, zmax);
  std::vector<uint64_t> counts(A, 0);
  for (uint32_t i = 0; i < kSzpeMaxAlphabet + 1; ++i) counts[std::min(i, A - 1)] += hist[i];
  const std::vector<uint32_t> freq = normalise(counts, kRansScaleBits);
  std::vector<uint32_t> cum(A + 1, 0);
  for (uint32_t i = 0; i < A; ++i) cum[i + 1] = cum[i] + freq[i];

  // Pass 2: the streams.
  std::vector<Stream> streams(NS);
  parallel_for(NS, 1, [&](uint64_t s0, uint64_t s1) {
    std::vector<int32_t> q;
    for (uint64_t s = s0; s < s1; ++s) {
      stream_q(szp, v, G, s, q);
      encode_stream(q, v.segment_len, A, freq, cum, streams[s]);
    }
  });

  uint64_t payload = 0, n_escapes = 0;
  for (const Stream& st : streams) payload += st.bytes.size(), n_escapes += st.escapes.size();
  const uint32_t escape_bytes = u16_escapes(zmax, A) ? 2 : 4;
  const uint32_t raw_bytes = dtype_size(v.dtype);
  const uint64_t X = v.n_exceptions;
  auto pad4 = [](uint64_t n) { return (n + 3) & ~uint64_t{3}; };
  uint64_t at = kSzpeHeaderBytes + 8ull * v.ndim;
  const uint64_t freq_at = at;
  at += 2ull * ((A + 3) & ~3u);  // padded to 8 bytes: the u64 tables stay aligned
  const uint64_t stream_offsets_at = at;
  at += 8 * (NS + 1);
  const uint64_t escape_index_at = at;
  at += 8 * (NS + 1);
  const uint64_t szp_stream_offsets_at = at;
  at += 8 * (NS + 1);
  const uint64_t exc_index_at = at;
  at += X ? 8 * (NS + 1) : 0;
  const uint64_t exc_pos_at = at;
  at += 4 * X;
  const uint64_t exc_raw_at = at;
  at += pad4(raw_bytes * X);
  const uint64_t escapes_at = at;
  at += pad4(escape_bytes * n_escapes);
  const uint64_t payload_at = at;
  const uint64_t total = at + payload + 4;

  std::vector<uint8_t> buf(total, 0);
  store<uint32_t>(buf, 0, kSzpeMagic);
  store<uint16_t>(buf, 4, kSzpeVersion);
  buf[6] = static_cast<uint8_t>(v.dtype);
  buf[7] = static_cast<uint8_t>(v.ndim);
  store<uint32_t>(buf, 8, A);
  store<uint32_t>(buf, 12, (X ? kSzpFlagExceptions : 0u) | (escape_bytes == 2 ? kSzpeFlagU16Escapes : 0u));
  store<double>(buf, 16, v.eb);
  store<float>(buf, 24, v.step);
  store<uint32_t>(buf, 28, kRansScaleBits);
  store<uint64_t>(buf, 32, v.numel);
  store<uint64_t>(buf, 40, v.segment_len);
  store<uint64_t>(buf, 48, X);
  store<uint64_t>(buf, 56, n_escapes);
  store<uint64_t>(buf, 64, payload);
  store<uint64_t>(buf, 72, G);
  store<uint64_t>(buf, 80, v.payload_bytes);  // the szp buffer it transcodes back to
  store<uint32_t>(buf, 88, v.max_width);
  store<uint32_t>(buf, 92, load<uint32_t>(szp + v.total_bytes - 4));
  for (uint32_t i = 0; i < v.ndim; ++i) store<uint64_t>(buf, kSzpeHeaderBytes + 8ull * i, v.shape[i]);
  for (uint32_t i = 0; i < A; ++i) store<uint16_t>(buf, freq_at + 2ull * i, static_cast<uint16_t>(freq[i]));
  uint64_t off = 0, esc = 0, exc = 0;
  for (uint64_t s = 0; s <= NS; ++s) {
    store<uint64_t>(buf, stream_offsets_at + 8 * s, off);
    store<uint64_t>(buf, escape_index_at + 8 * s, esc);
    store<uint64_t>(buf, szp_stream_offsets_at + 8 * s,
                   S ? load<uint64_t>(szp + v.seg_offsets_at + 8 * std::min(S, s * G)) : 0);
    if (X) store<uint64_t>(buf, exc_index_at + 8 * s, exc);
    if (s == NS) break;
    memcpy(buf.data() + payload_at + off, streams[s].bytes.data(), streams[s].bytes.size());
    for (uint32_t z : streams[s].escapes) {
      if (escape_bytes == 2) store<uint16_t>(buf, escapes_at + 2 * esc, static_cast<uint16_t>(z - (A - 1)));
      else store<uint32_t>(buf, escapes_at + 4 * esc, z);
      ++esc;
    }
    off += streams[s].bytes.size();
    if (!X) continue;
    for (uint64_t g = s * G; g < std::min(S, (s + 1) * G); ++g)  // the stream's exceptions, by position
      szp_layout::for_each_exception(szp + v.exc_offsets_at, szp + v.exc_entries_at, g, [&](uint32_t pos, uint32_t raw) {
        store<uint32_t>(buf, exc_pos_at + 4 * exc, static_cast<uint32_t>((g - s * G) * v.segment_len + pos));
        if (raw_bytes == 2) store<uint16_t>(buf, exc_raw_at + 2 * exc, static_cast<uint16_t>(raw));
        else store<uint32_t>(buf, exc_raw_at + 4 * exc, raw);
        ++exc;
      });
  }
  store<uint32_t>(buf, total - 4, crc32(buf.data(), total - 4));
  return buf;
}

}  // namespace moeoffload
