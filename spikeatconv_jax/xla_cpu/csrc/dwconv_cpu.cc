// Depthwise 2-D convolution for XLA:CPU as XLA FFI custom calls: forward, input gradient and
// kernel gradient of y[n, i, j, c] = sum_{a, b} x[n, i*sh + a - pt, j*sw + b - pl, c] * w[a, b, c]
// (NHWC, float32, zero padding outside x). XLA:CPU runs grouped convolutions at under
// 1 GFLOP/s; these loops are vectorised over the contiguous channel axis with the accumulators
// in registers, and split across XLA's intra-op thread pool.
//
// Each kernel also takes B branches (MBPL's merge, y = sum_k conv(x_k, w_k)) as separate operands,
// so the branches are never stacked into one tensor: the forward sums B inputs into one output,
// the input gradient writes B outputs from one cotangent, the kernel gradient reads B inputs.
// The branch weights are one [B, kh, kw, C] operand.
//
// Built on first use by spikeatconv_jax/xla_cpu/native.py (g++ -O3 -march=native against
// jax.ffi.include_dir()); the channel multiplier is a reshape around these kernels on the
// Python side.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats; unaligned loads and stores through memcpy compile to single vector moves.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// Branch inputs (x) are float32, or int8 for integer-valued inputs such as spikes: a quarter of
// the memory traffic, widened to float in registers. Weights, cotangents and outputs are float32.
// (GCC scalarises __builtin_convertvector from int8, hence the intrinsics.)
inline v16 load(const int8_t* p) {
  v16 v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  std::memcpy(&v, &f, sizeof(v));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  const __m256 hi =
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  for (int i = 0; i < 16; ++i) v[i] = p[i];
#endif
  return v;
}

struct Geometry {
  int64_t n, h, w, c;    // input
  int64_t ho, wo;        // output
  int64_t kh, kw;        // kernel
  int64_t sh, sw;        // strides
  int64_t pt, pl;        // top/left zero padding
};

// Runs fn(begin, end, part) over [0, total) in `parts` contiguous ranges: the calling thread and
// XLA's pool threads pull ranges from a shared counter, and the caller returns once every range
// is done. The caller never waits for a task to *start* (pool threads may all be busy running
// other ops), only for ranges another thread has already claimed, so this cannot deadlock.
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t parts,
                 const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  parts = std::max<int64_t>(1, std::min(parts, total));
  if (parts == 1) {
    fn(0, total, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  // Pool tasks may start after this call returned; they then find no range left and only touch
  // the shared state, which they keep alive. `fn` is only called for claimed ranges, all of
  // which finish before the caller returns.
  const auto* fnp = &fn;
  auto run = [state, total, parts, fnp]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      (*fnp)(total * p / parts, total * (p + 1) / parts, p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

int64_t Parts(ffi::ThreadPool& pool) {
  int64_t threads = pool.num_threads();
  return threads > 0 ? 2 * threads : 1;
}

// Calls block(std::integral_constant<int, V>{}, c) for V-register (16·V-channel) blocks from
// channel c0 on, V = 4, 2, 1, then tail(c) once for the channels left over, if any.
template <typename Block, typename Tail>
inline void ChannelBlocks(int64_t c0, int64_t channels, Block&& block, Tail&& tail) {
  for (; c0 + 64 <= channels; c0 += 64) block(std::integral_constant<int, 4>{}, c0);
  for (; c0 + 32 <= channels; c0 += 32) block(std::integral_constant<int, 2>{}, c0);
  for (; c0 + 16 <= channels; c0 += 16) block(std::integral_constant<int, 1>{}, c0);
  if (c0 < channels) tail(c0);
}

// ---------------------------------------------------------------------------------------------
// Forward: one output pixel at a time, up to 64 channels (four registers) per pass over the taps.

template <int V, typename TX>
inline void FwdPixel(const Geometry& g, const TX* x, const float* w, float* y, int64_t n,
                     int64_t i, int64_t j, int64_t c0, bool add) {
  float* yp = y + ((n * g.ho + i) * g.wo + j) * g.c + c0;
  v16 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = add ? load(yp + 16 * v) : v16{};
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t hi = i * g.sh + a - g.pt;
    if (hi < 0 || hi >= g.h) continue;
    const TX* xrow = x + ((n * g.h + hi) * g.w) * g.c + c0;
    const float* wrow = w + (a * g.kw) * g.c + c0;
    for (int64_t b = 0; b < g.kw; ++b) {
      const int64_t wi = j * g.sw + b - g.pl;
      if (wi < 0 || wi >= g.w) continue;
      const TX* xp = xrow + wi * g.c;
      const float* wp = wrow + b * g.c;
      for (int v = 0; v < V; ++v) acc[v] += load(xp + 16 * v) * load(wp + 16 * v);
    }
  }
  for (int v = 0; v < V; ++v) store(yp + 16 * v, acc[v]);
}

template <typename TX>
inline void FwdPixelScalar(const Geometry& g, const TX* x, const float* w, float* y, int64_t n,
                           int64_t i, int64_t j, int64_t c0, bool add) {
  float* yp = y + ((n * g.ho + i) * g.wo + j) * g.c;
  for (int64_t c = c0; c < g.c; ++c) {
    float acc = add ? yp[c] : 0.f;
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t hi = i * g.sh + a - g.pt;
      if (hi < 0 || hi >= g.h) continue;
      for (int64_t b = 0; b < g.kw; ++b) {
        const int64_t wi = j * g.sw + b - g.pl;
        if (wi < 0 || wi >= g.w) continue;
        acc += x[((n * g.h + hi) * g.w + wi) * g.c + c] * w[(a * g.kw + b) * g.c + c];
      }
    }
    yp[c] = acc;
  }
}

// Register-blocked forward for kernel width KW and column stride S: P adjacent outputs of one
// row and 16 channels. Per kernel row the KW weights stay in registers and each input column
// is loaded once for all the outputs that read it, so the loop runs on FMAs rather than loads.
// kEdge: some of the block's input columns may lie in the zero padding (they are skipped), and
// only the first `valid` outputs are stored (the row's last block may be partial).
// add: accumulate onto y (the branches after the first of a branch sum) instead of overwriting.
constexpr int kBlock = 8;

template <int KW, int S>
inline bool Interior(const Geometry& g, int64_t j0) {
  return j0 + kBlock <= g.wo && j0 * S - g.pl >= 0 && (j0 + kBlock - 1) * S + KW - 1 - g.pl < g.w;
}

// Where the blocked forward reads input row (n, hi): the input itself (pixel stride C), or a
// packed copy of some rows and a channel range [c_lo, ...) with a padded pixel stride.
template <typename TX>
struct XRows {
  const TX* base;
  int64_t n_stride, row_stride, pix;  // elements between images, rows and pixels
  int64_t hi0, c_lo;                  // first row and channel held
  const TX* row(int64_t n, int64_t hi) const {
    return base + n * n_stride + (hi - hi0) * row_stride - c_lo;
  }
};

template <typename TX>
XRows<TX> Unpacked(const Geometry& g, const TX* x) {
  return XRows<TX>{x, g.h * g.w * g.c, g.w * g.c, g.c, 0, 0};
}

// Always inlined: as a call (GCC's choice once the packed forward instantiates it a second
// time) the blocked forward ran at less than half its inlined rate.
template <int KW, int S, bool kEdge, bool kAdd, typename TX>
__attribute__((always_inline)) inline void FwdBlock(const Geometry& g, const XRows<TX> xr,
                                                    const float* w, float* y, int64_t n, int64_t i,
                                                    int64_t j0, int64_t c0, int64_t valid) {
  constexpr int P = kBlock;
  const int64_t col0 = j0 * S - g.pl;
  const int64_t pix = xr.pix;
  float* yp = y + ((n * g.ho + i) * g.wo + j0) * g.c + c0;
  v16 acc[P];
  for (int p = 0; p < P; ++p) acc[p] = kAdd && (!kEdge || p < valid) ? load(yp + p * g.c) : v16{};
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t hi = i * g.sh + a - g.pt;
    if (hi < 0 || hi >= g.h) continue;
    const TX* xrow = xr.row(n, hi) + col0 * pix + c0;
    const float* wrow = w + (a * KW) * g.c + c0;
    v16 wr[KW];
#pragma GCC unroll 16
    for (int b = 0; b < KW; ++b) wr[b] = load(wrow + b * g.c);
#pragma GCC unroll 32
    for (int q = 0; q < S * (P - 1) + KW; ++q) {
      if (kEdge && (col0 + q < 0 || col0 + q >= g.w)) continue;
      const v16 xq = load(xrow + q * pix);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int b = q - S * p;
        if (b >= 0 && b < KW) acc[p] += xq * wr[b];
      }
    }
  }
  if (kEdge) {
    for (int p = 0; p < P; ++p)
      if (p < valid) store(yp + p * g.c, acc[p]);
  } else {
    for (int p = 0; p < P; ++p) store(yp + p * g.c, acc[p]);
  }
}

// One output row, channels [c_lo, c_hi) in 16-channel slices, in blocks of kBlock outputs
// (edge blocks skip the padding). The channel slices are the inner loop, so consecutive blocks
// read consecutive cache lines of the same input pixels.
template <int KW, int S, bool kAdd, typename TX>
void FwdRowT(const Geometry& g, const XRows<TX> x, const float* w, float* y, int64_t n, int64_t i,
             int64_t c_lo, int64_t c_hi) {
  for (int64_t j = 0; j < g.wo; j += kBlock) {
    if (Interior<KW, S>(g, j)) {
      for (int64_t c0 = c_lo; c0 < c_hi; c0 += 16)
        FwdBlock<KW, S, false, kAdd>(g, x, w, y, n, i, j, c0, kBlock);
    } else {
      const int64_t valid = std::min<int64_t>(kBlock, g.wo - j);
      for (int64_t c0 = c_lo; c0 < c_hi; c0 += 16)
        FwdBlock<KW, S, true, kAdd>(g, x, w, y, n, i, j, c0, valid);
    }
  }
}

// `add` is a template argument of the blocks, so the plain (K=1) conv compiles as before.
template <int KW, int S, typename TX>
void FwdRow(const Geometry& g, const XRows<TX> x, const float* w, float* y, int64_t n, int64_t i,
            int64_t c_lo, int64_t c_hi, bool add) {
  if (add) FwdRowT<KW, S, true>(g, x, w, y, n, i, c_lo, c_hi);
  else FwdRowT<KW, S, false>(g, x, w, y, n, i, c_lo, c_hi);
}

// Input pixels a power-of-two multiple of 1 KiB apart (C = 256 floats, 1024 int8 values, and
// more) map the blocked forward's column loads to a few L1 sets, so each block's ~100 input
// lines evict one another and the prefetched ones (at 1024 channels the input gradient ran at a
// third of its speed at 1008). Such inputs are read from a packed copy of each band of rows with
// a padded pixel stride instead.
template <typename TX>
bool PackRows(const Geometry& g) {
  const int64_t bytes = g.c * int64_t{sizeof(TX)};
  return bytes >= 1024 && bytes % 1024 == 0;
}
constexpr int64_t kBandRows = 8;  // output rows per packed band

// Channels per chunk for the blocked rows: the input rows that stay in use, `rows` rows of
// `elem_bytes`-byte values over one chunk, should stay in L2 (about 512 KiB of them) while
// consecutive output rows reuse them (the kh rows of one output row, or a packed band's rows).
int64_t ChunkChannels(const Geometry& g, int64_t c_vec, int64_t rows,
                      int64_t elem_bytes = int64_t{sizeof(float)}) {
  const int64_t fit = (int64_t{512} * 1024 / (rows * g.w * elem_bytes)) / 16 * 16;
  return std::min(c_vec, std::max<int64_t>(16, fit));
}

// One conv of a branched call: y (+)= conv(x, w); `add` accumulates onto y.
template <typename TX>
struct Term {
  const TX* x;
  const float* w;
  float* y;
  bool add;
};

// The tail channels (past the last multiple of 16) of one output row, pixel by pixel.
template <typename TX>
void FwdRowTail(const Geometry& g, const Term<TX>& t, int64_t n, int64_t i, int64_t c_vec) {
  for (int64_t j = 0; j < g.wo; ++j) {
    ChannelBlocks(
        c_vec, g.c,
        [&](auto v, int64_t c) {
          FwdPixel<decltype(v)::value>(g, t.x, t.w, t.y, n, i, j, c, t.add);
        },
        [&](int64_t c) { FwdPixelScalar(g, t.x, t.w, t.y, n, i, j, c, t.add); });
  }
}

// Forward for PackRows inputs. Work items: (channel chunk, image, band of kBandRows output
// rows). Each item copies the input rows its band reads, over its channels, into a per-thread
// buffer with a pixel stride of chunk + 64 bytes (one input per run of terms sharing it, so the
// input gradient's B terms on one cotangent pack it once), then runs the blocked rows on it.
template <typename TX>
void ForwardPacked(const Geometry& g, const std::vector<Term<TX>>& terms, ffi::ThreadPool& pool,
                   int64_t c_vec) {
  const int64_t band_in = (kBandRows - 1) * g.sh + g.kh;  // input rows a band reads
  const int64_t chunk = ChunkChannels(g, c_vec, band_in, int64_t{sizeof(TX)});
  const int64_t chunks = (c_vec + chunk - 1) / chunk;
  const int64_t cs = chunk + 64 / int64_t{sizeof(TX)};
  const int64_t bands = (g.ho + kBandRows - 1) / kBandRows;
  const int64_t items = chunks * g.n * bands;
  const int64_t parts = std::max<int64_t>(1, std::min(Parts(pool), items));
  ParallelFor(pool, items, parts, [&](int64_t begin, int64_t end, int64_t) {
    // Kept per thread across calls: under glibc malloc a fresh buffer of this size would be
    // mapped and page-faulted again on every call.
    thread_local std::vector<TX> buf;
    const size_t need = static_cast<size_t>(band_in * g.w * cs);
    if (buf.size() < need) buf.resize(need);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t k = u / (g.n * bands), n = (u / bands) % g.n, band = u % bands;
      const int64_t c_lo = k * chunk, c_hi = std::min(c_vec, c_lo + chunk);
      const int64_t i0 = band * kBandRows, i1 = std::min(g.ho, i0 + kBandRows);
      const int64_t hi0 = std::max<int64_t>(0, i0 * g.sh - g.pt);
      const int64_t hi1 = std::min(g.h, (i1 - 1) * g.sh - g.pt + g.kh);
      const XRows<TX> xr{buf.data(), 0, g.w * cs, cs, hi0, c_lo};
      const TX* packed = nullptr;
      for (const Term<TX>& t : terms) {
        if (t.x != packed) {
          for (int64_t hi = hi0; hi < hi1; ++hi) {
            const TX* src = t.x + ((n * g.h + hi) * g.w) * g.c + c_lo;
            TX* dst = buf.data() + (hi - hi0) * g.w * cs;
            for (int64_t q = 0; q < g.w; ++q)
              std::memcpy(dst + q * cs, src + q * g.c, sizeof(TX) * (c_hi - c_lo));
          }
          packed = t.x;
        }
        for (int64_t i = i0; i < i1; ++i) {
          if (g.sw == 1) FwdRow<7, 1>(g, xr, t.w, t.y, n, i, c_lo, c_hi, t.add);
          else FwdRow<7, 2>(g, xr, t.w, t.y, n, i, c_lo, c_hi, t.add);
          if (k == chunks - 1 && c_vec < g.c) FwdRowTail(g, t, n, i, c_vec);
        }
      }
    }
  });
}

// Work items: (channel chunk, output row) pairs, chunk-major, so that each thread's contiguous
// range walks down the rows of one chunk; each item runs every term on its row, so a branch
// sum accumulates in cache and the branches of one input reuse its rows from cache. Channels
// past the last multiple of 16 (and every channel of kernels other than 7 wide at stride 1 or
// 2) go pixel by pixel.
template <typename TX>
void Forward(const Geometry& g, const std::vector<Term<TX>>& terms, ffi::ThreadPool& pool) {
  const bool blocked = g.kw == 7 && (g.sw == 1 || g.sw == 2);
  const int64_t c_vec = blocked ? g.c / 16 * 16 : 0;
  if (c_vec > 0 && PackRows<TX>(g)) return ForwardPacked(g, terms, pool, c_vec);
  const int64_t chunk = c_vec > 0 ? ChunkChannels(g, c_vec, g.kh) : 1;
  const int64_t chunks = c_vec > 0 ? (c_vec + chunk - 1) / chunk : 1;
  const int64_t rows = g.n * g.ho;
  ParallelFor(pool, chunks * rows, Parts(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t k = u / rows, row = u % rows;
      const int64_t n = row / g.ho, i = row % g.ho;
      for (const Term<TX>& t : terms) {
        if (c_vec > 0) {
          const int64_t c_lo = k * chunk, c_hi = std::min(c_vec, c_lo + chunk);
          if (g.sw == 1) FwdRow<7, 1>(g, Unpacked(g, t.x), t.w, t.y, n, i, c_lo, c_hi, t.add);
          else FwdRow<7, 2>(g, Unpacked(g, t.x), t.w, t.y, n, i, c_lo, c_hi, t.add);
        }
        if (k == chunks - 1 && c_vec < g.c) FwdRowTail(g, t, n, i, c_vec);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Input gradient: dx[n, p, q, c] = sum over taps (a, b) with p + pt - a = i*sh and
// q + pl - b = j*sw inside the output of dy[n, i, j, c] * w[a, b, c]; a gather per input pixel.

template <int V>
inline void BwdInputPixel(const Geometry& g, const float* dy, const float* w, float* dx,
                          int64_t n, int64_t p, int64_t q, int64_t c0) {
  v16 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = v16{};
  for (int64_t a = (p + g.pt) % g.sh; a < g.kh; a += g.sh) {
    const int64_t i = (p + g.pt - a) / g.sh;
    if (p + g.pt - a < 0) break;  // larger a only makes it more negative
    if (i >= g.ho) continue;
    const float* dyrow = dy + ((n * g.ho + i) * g.wo) * g.c + c0;
    const float* wrow = w + (a * g.kw) * g.c + c0;
    for (int64_t b = (q + g.pl) % g.sw; b < g.kw; b += g.sw) {
      if (q + g.pl - b < 0) break;
      const int64_t j = (q + g.pl - b) / g.sw;
      if (j >= g.wo) continue;
      const float* dp = dyrow + j * g.c;
      const float* wp = wrow + b * g.c;
      for (int v = 0; v < V; ++v) acc[v] += load(dp + 16 * v) * load(wp + 16 * v);
    }
  }
  float* out = dx + ((n * g.h + p) * g.w + q) * g.c + c0;
  for (int v = 0; v < V; ++v) store(out + 16 * v, acc[v]);
}

inline void BwdInputPixelScalar(const Geometry& g, const float* dy, const float* w, float* dx,
                                int64_t n, int64_t p, int64_t q, int64_t c0) {
  for (int64_t c = c0; c < g.c; ++c) {
    float acc = 0.f;
    for (int64_t a = (p + g.pt) % g.sh; a < g.kh; a += g.sh) {
      if (p + g.pt - a < 0) break;
      const int64_t i = (p + g.pt - a) / g.sh;
      if (i >= g.ho) continue;
      for (int64_t b = (q + g.pl) % g.sw; b < g.kw; b += g.sw) {
        if (q + g.pl - b < 0) break;
        const int64_t j = (q + g.pl - b) / g.sw;
        if (j >= g.wo) continue;
        acc += dy[((n * g.ho + i) * g.wo + j) * g.c + c] * w[(a * g.kw + b) * g.c + c];
      }
    }
    dx[((n * g.h + p) * g.w + q) * g.c + c] = acc;
  }
}

// dx[k] = conv_transpose(dy, w[k]) for each branch k (w holds the B kernels back to back).
void BackwardInput(const Geometry& g, const float* dy, const float* w,
                   const std::vector<float*>& dx, ffi::ThreadPool& pool) {
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t nb = static_cast<int64_t>(dx.size());
  if (g.sh == 1 && g.sw == 1) {
    // A stride-1 transposed conv is a conv of dy with the flipped kernel and mirrored padding:
    // dx[p, q] = sum_{a, b} dy[p - (kh-1-pt) + a, q - (kw-1-pl) + b] * w[kh-1-a, kw-1-b].
    std::vector<float> flipped(static_cast<size_t>(nb * taps));
    std::vector<Term<float>> terms;
    for (int64_t k = 0; k < nb; ++k) {
      float* fk = flipped.data() + k * taps;
      const float* wk = w + k * taps;
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b)
          std::memcpy(fk + (a * g.kw + b) * g.c, wk + ((g.kh - 1 - a) * g.kw + g.kw - 1 - b) * g.c,
                      sizeof(float) * g.c);
      terms.push_back(Term<float>{dy, fk, dx[k], false});
    }
    const Geometry t{g.n, g.ho, g.wo, g.c, g.h, g.w, g.kh, g.kw, 1, 1, g.kh - 1 - g.pt,
                     g.kw - 1 - g.pl};
    Forward(t, terms, pool);
    return;
  }
  ParallelFor(pool, g.n * g.h, Parts(pool), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.h, p = row % g.h;
      for (int64_t k = 0; k < nb; ++k) {
        const float* wk = w + k * taps;
        for (int64_t q = 0; q < g.w; ++q) {
          ChannelBlocks(
              0, g.c,
              [&](auto v, int64_t c) {
                BwdInputPixel<decltype(v)::value>(g, dy, wk, dx[k], n, p, q, c);
              },
              [&](int64_t c) { BwdInputPixelScalar(g, dy, wk, dx[k], n, p, q, c); });
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Kernel gradient: dw[a, b, c] = sum_{n, i, j} x[n, i*sh + a - pt, j*sw + b - pl, c] * dy[n, i, j, c].
// Each part sums its range of output rows into its own [kh, kw, C] buffer; for one output row
// and one tap the 64-channel accumulators stay in registers along the row.

template <int V, typename TX>
inline void BwdKernelRowTap(const Geometry& g, const TX* x, const float* dy, float* dw,
                            int64_t n, int64_t i, int64_t a, int64_t b, int64_t c0) {
  const int64_t hi = i * g.sh + a - g.pt;
  if (hi < 0 || hi >= g.h) return;
  // Output columns j whose input column j*sw + b - pl lies inside [0, w).
  const int64_t last = g.w - 1 + g.pl - b;  // j*sw <= last
  if (last < 0) return;
  const int64_t j_lo = std::max<int64_t>(0, (g.pl - b + g.sw - 1) / g.sw);  // 0 when pl < b
  const int64_t j_hi = std::min<int64_t>(g.wo, last / g.sw + 1);
  if (j_lo >= j_hi) return;
  v16 acc[V];
  float* out = dw + (a * g.kw + b) * g.c + c0;
  for (int v = 0; v < V; ++v) acc[v] = load(out + 16 * v);
  const TX* xrow = x + ((n * g.h + hi) * g.w) * g.c + c0;
  const float* dyrow = dy + ((n * g.ho + i) * g.wo) * g.c + c0;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    const TX* xp = xrow + (j * g.sw + b - g.pl) * g.c;
    const float* dp = dyrow + j * g.c;
    for (int v = 0; v < V; ++v) acc[v] += load(xp + 16 * v) * load(dp + 16 * v);
  }
  for (int v = 0; v < V; ++v) store(out + 16 * v, acc[v]);
}

template <typename TX>
inline void BwdKernelRowTapScalar(const Geometry& g, const TX* x, const float* dy, float* dw,
                                  int64_t n, int64_t i, int64_t a, int64_t b, int64_t c0) {
  const int64_t hi = i * g.sh + a - g.pt;
  if (hi < 0 || hi >= g.h) return;
  for (int64_t j = 0; j < g.wo; ++j) {
    const int64_t wi = j * g.sw + b - g.pl;
    if (wi < 0 || wi >= g.w) continue;
    for (int64_t c = c0; c < g.c; ++c)
      dw[(a * g.kw + b) * g.c + c] +=
          x[((n * g.h + hi) * g.w + wi) * g.c + c] * dy[((n * g.ho + i) * g.wo + j) * g.c + c];
  }
}

// Register-blocked kernel gradient for one output row, one kernel row `a` and 16 channels: the
// KW tap sums stay in registers across the row; inside the row P outputs at a time load each
// input column once for every tap that reads it. Edge blocks (some input columns in the zero
// padding, or fewer than P outputs left) skip those columns and outputs.
template <int KW, int S, typename TX>
void BwdKernelRow(const Geometry& g, const TX* x, const float* dy, float* dw, int64_t n,
                  int64_t i, int64_t a, int64_t c0) {
  constexpr int P = kBlock;
  const int64_t hi = i * g.sh + a - g.pt;
  if (hi < 0 || hi >= g.h) return;
  const TX* xrow = x + ((n * g.h + hi) * g.w) * g.c + c0;
  const float* dyrow = dy + ((n * g.ho + i) * g.wo) * g.c + c0;
  float* out = dw + (a * KW) * g.c + c0;
  v16 acc[KW];
#pragma GCC unroll 16
  for (int b = 0; b < KW; ++b) acc[b] = load(out + b * g.c);
  auto block = [&](auto edge, int64_t j0, int64_t valid) {
    constexpr bool kEdge = decltype(edge)::value;
    const int64_t col0 = j0 * S - g.pl;
    v16 d[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) d[p] = !kEdge || p < valid ? load(dyrow + (j0 + p) * g.c) : v16{};
#pragma GCC unroll 32
    for (int q = 0; q < S * (P - 1) + KW; ++q) {
      if (kEdge && (col0 + q < 0 || col0 + q >= g.w)) continue;
      const v16 xq = load(xrow + (col0 + q) * g.c);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int b = q - S * p;
        if (b >= 0 && b < KW && (!kEdge || p < valid)) acc[b] += xq * d[p];
      }
    }
  };
  for (int64_t j = 0; j < g.wo; j += P) {
    if (Interior<KW, S>(g, j)) block(std::false_type{}, j, P);
    else block(std::true_type{}, j, std::min<int64_t>(P, g.wo - j));
  }
#pragma GCC unroll 16
  for (int b = 0; b < KW; ++b) store(out + b * g.c, acc[b]);
}

// dw[k] = kernel gradient of conv(x[k], .) against dy, for each branch k (dw holds the B
// kernel gradients back to back). Each part sums its range of output rows into its own buffer.
template <typename TX>
void BackwardKernel(const Geometry& g, const std::vector<const TX*>& xs, const float* dy,
                    float* dw, ffi::ThreadPool& pool) {
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t nb = static_cast<int64_t>(xs.size());
  const int64_t rows = g.n * g.ho;
  const int64_t parts = std::max<int64_t>(1, std::min(Parts(pool), rows));
  std::vector<float> partial(static_cast<size_t>(parts * nb * taps), 0.f);
  ParallelFor(pool, rows, parts, [&](int64_t begin, int64_t end, int64_t part) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.ho, i = row % g.ho;
      for (int64_t k = 0; k < nb; ++k) {
        const TX* x = xs[k];
        float* acc = partial.data() + (part * nb + k) * taps;
        for (int64_t a = 0; a < g.kh; ++a) {
          int64_t c_blocked = 0;
          if (g.kw == 7 && (g.sw == 1 || g.sw == 2)) {
            for (; c_blocked + 16 <= g.c; c_blocked += 16) {
              if (g.sw == 1) BwdKernelRow<7, 1>(g, x, dy, acc, n, i, a, c_blocked);
              else BwdKernelRow<7, 2>(g, x, dy, acc, n, i, a, c_blocked);
            }
          }
          for (int64_t b = 0; b < g.kw; ++b) {
            ChannelBlocks(
                c_blocked, g.c,
                [&](auto v, int64_t c) {
                  BwdKernelRowTap<decltype(v)::value>(g, x, dy, acc, n, i, a, b, c);
                },
                [&](int64_t c) { BwdKernelRowTapScalar(g, x, dy, acc, n, i, a, b, c); });
          }
        }
      }
    }
  });
  std::fill(dw, dw + nb * taps, 0.f);
  for (int64_t p = 0; p < parts; ++p) {
    const float* src = partial.data() + p * nb * taps;
    for (int64_t t = 0; t < nb * taps; ++t) dw[t] += src[t];
  }
}

// ---------------------------------------------------------------------------------------------
// FFI bindings. B >= 1 branches; shapes: x_k [N, H, W, C], w [B, kh, kw, C], y/dy [N, Ho, Wo, C].
// x_k are all float32 or all int8; everything else is float32.
//   fwd:        (w, x_1 .. x_B)  -> y                y = sum_k conv(x_k, w[k])
//   bwd_input:  (w, dy)          -> dx_1 .. dx_B     dx_k = conv_transpose(dy, w[k])
//   bwd_kernel: (dy, x_1 .. x_B) -> dw [B, kh, kw, C]

using Dims = ffi::AnyBuffer::Dimensions;

// Checks the shapes, in their roles x [N, H, W, C] (every branch), w [B, kh, kw, C],
// y [N, Ho, Wo, C] (for the input gradient x is dx and y is dy; for the kernel gradient w is
// dw), and fills `g`.
ffi::Error MakeGeometry(const std::vector<Dims>& xds, const Dims& wd, const Dims& yd, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pl, Geometry* g) {
  if (xds.empty()) return ffi::Error::InvalidArgument("depthwise conv: no branch operands");
  const Dims& xd = xds[0];
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument(
        "depthwise conv wants inputs [N, H, W, C], kernel [B, kh, kw, C], output [N, Ho, Wo, C]");
  for (const Dims& d : xds)
    if (!std::equal(d.begin(), d.end(), xd.begin(), xd.end()))
      return ffi::Error::InvalidArgument("depthwise conv: branch shapes differ");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[1], wd[2], sh, sw, pt, pl};
  if (wd[0] != static_cast<int64_t>(xds.size()))
    return ffi::Error::InvalidArgument("depthwise conv: kernel branches disagree with operands");
  if (wd[3] != g->c || yd[3] != g->c || yd[0] != g->n)
    return ffi::Error::InvalidArgument("depthwise conv: channel or batch sizes disagree");
  if (sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("depthwise conv: strides must be positive");
  return ffi::Error::Success();
}

// Decodes the float32 results `list` (the input gradients) from index 0 on.
ffi::Error DecodeRets(const ffi::RemainingRets& list, std::vector<Dims>* dims,
                      std::vector<float*>* data) {
  for (size_t k = 0; k < list.size(); ++k) {
    auto buf = list.get<ffi::Buffer<ffi::F32>>(k);
    if (buf.has_error()) return buf.error();
    dims->push_back(buf.value()->dimensions());
    data->push_back(buf.value()->typed_data());
  }
  return ffi::Error::Success();
}

// Decodes the branch inputs `list`: all float32, or all int8.
ffi::Error DecodeInputs(const ffi::RemainingArgs& list, std::vector<Dims>* dims,
                        std::vector<const void*>* data, ffi::DataType* dtype) {
  for (size_t k = 0; k < list.size(); ++k) {
    auto buf = list.get<ffi::AnyBuffer>(k);
    if (buf.has_error()) return buf.error();
    const ffi::DataType t = buf.value().element_type();
    if (t != ffi::DataType::F32 && t != ffi::DataType::S8)
      return ffi::Error::InvalidArgument("depthwise conv: branch inputs must be float32 or int8");
    if (k > 0 && t != *dtype)
      return ffi::Error::InvalidArgument("depthwise conv: branch input dtypes differ");
    *dtype = t;
    dims->push_back(buf.value().dimensions());
    data->push_back(buf.value().untyped_data());
  }
  return ffi::Error::Success();
}

template <typename TX>
std::vector<const TX*> Typed(const std::vector<const void*>& data) {
  std::vector<const TX*> out;
  for (const void* p : data) out.push_back(static_cast<const TX*>(p));
  return out;
}

// Calls fn with the branch pointers typed as their decoded dtype (int8 or float32).
template <typename Fn>
void WithTypedInputs(ffi::DataType dtype, const std::vector<const void*>& x, Fn&& fn) {
  if (dtype == ffi::DataType::S8) fn(Typed<int8_t>(x));
  else fn(Typed<float>(x));
}

template <typename TX>
void ForwardBranches(const Geometry& g, const std::vector<const TX*>& x, const float* w, float* y,
                     ffi::ThreadPool& pool) {
  const int64_t taps = g.kh * g.kw * g.c;
  std::vector<Term<TX>> terms;
  for (size_t k = 0; k < x.size(); ++k) terms.push_back(Term<TX>{x[k], w + k * taps, y, k > 0});
  Forward(g, terms, pool);
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::RemainingArgs xs,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  std::vector<Dims> xds;
  std::vector<const void*> x;
  ffi::DataType dtype = ffi::DataType::F32;
  Geometry g;
  if (auto e = DecodeInputs(xs, &xds, &x, &dtype); e.failure()) return e;
  if (auto e = MakeGeometry(xds, w.dimensions(), y->dimensions(), sh, sw, pt, pl, &g); e.failure())
    return e;
  WithTypedInputs(dtype, x, [&](const auto& xt) {
    ForwardBranches(g, xt, w.typed_data(), y->typed_data(), pool);
  });
  return ffi::Error::Success();
}

ffi::Error BwdInputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dy,
                        ffi::RemainingRets dxs, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  std::vector<Dims> xds;
  std::vector<float*> dx;
  Geometry g;
  if (auto e = DecodeRets(dxs, &xds, &dx); e.failure()) return e;
  if (auto e = MakeGeometry(xds, w.dimensions(), dy.dimensions(), sh, sw, pt, pl, &g); e.failure())
    return e;
  BackwardInput(g, dy.typed_data(), w.typed_data(), dx, pool);
  return ffi::Error::Success();
}

ffi::Error BwdKernelImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::RemainingArgs xs,
                         ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                         int64_t pl) {
  std::vector<Dims> xds;
  std::vector<const void*> x;
  ffi::DataType dtype = ffi::DataType::F32;
  Geometry g;
  if (auto e = DecodeInputs(xs, &xds, &x, &dtype); e.failure()) return e;
  if (auto e = MakeGeometry(xds, dw->dimensions(), dy.dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  WithTypedInputs(dtype, x, [&](const auto& xt) {
    BackwardKernel(g, xt, dy.typed_data(), dw->typed_data(), pool);
  });
  return ffi::Error::Success();
}

// The identity as a custom call, its result aliased to its operand (so normally nothing is
// copied). XLA cannot fuse through a custom call: the operand is computed once into a buffer
// instead of being recomputed inside every fusion that reads it (fusion_barrier in Python).
ffi::Error BarrierImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.element_count() != y->element_count() || x.element_type() != y->element_type())
    return ffi::Error::InvalidArgument("fusion barrier: result differs from operand");
  if (x.untyped_data() != y->untyped_data())
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

#define SPIKEATCONV_ATTRS(binding) \
  binding.Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeAtConvDwconvFwd, FwdImpl,
                              SPIKEATCONV_ATTRS(ffi::Ffi::Bind()
                                                    .Ctx<ffi::ThreadPool>()
                                                    .Arg<ffi::Buffer<ffi::F32>>()
                                                    .RemainingArgs()
                                                    .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeAtConvDwconvBwdInput, BwdInputImpl,
                              SPIKEATCONV_ATTRS(ffi::Ffi::Bind()
                                                    .Ctx<ffi::ThreadPool>()
                                                    .Arg<ffi::Buffer<ffi::F32>>()
                                                    .Arg<ffi::Buffer<ffi::F32>>()
                                                    .RemainingRets()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeAtConvDwconvBwdKernel, BwdKernelImpl,
                              SPIKEATCONV_ATTRS(ffi::Ffi::Bind()
                                                    .Ctx<ffi::ThreadPool>()
                                                    .Arg<ffi::Buffer<ffi::F32>>()
                                                    .RemainingArgs()
                                                    .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeAtConvFusionBarrier, BarrierImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
