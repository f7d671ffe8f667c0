// CPU kernels for the condensed format: y[b, o] = bias[o] + sum_j values[i, j] * x[b, cols[i, j]]
// for the active output neurons o = rows[i]; every other output neuron gives exactly bias[o]
// (or 0). Registered as a torch operator (torch.ops.sparsity_formats.condensed_linear) and as a
// function of this Python extension module (what the formats call); built on first use by
// sparsity_formats._native and replaced by a pure-PyTorch path when it cannot be built.
//
// Two regimes:
//  * batch 1 (online inference): one dot product per active neuron, gathering the input at the
//    stored column indices. The gathers, not the memory traffic, bound it on the CPU measured
//    (about one cycle per stored weight, with the weight in cache or not), so the loop keeps
//    several independent gathers in flight: two rows at once while the weight fits in cache.
//  * batch >= 2: the input is transposed once into tiles [in, T]; each active neuron
//    accumulates values[i, j] * tile[cols[i, j], :] into T/8 vector registers, and the [active,
//    batch] result is transposed into the output in cache blocks.
// Both split the active neurons over torch's intra-op threads (at::parallel_for), so
// torch.set_num_threads governs them like any other operator.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSITY_AVX2 1
#else
#define SPARSITY_AVX2 0
#endif

namespace {

// ---- error messages -------------------------------------------------------------------------
// Messages are built as one std::string (numbers through std::to_string) and handed to
// TORCH_CHECK whole, so no iostream formats a number inside this library: built with GCC 13
// against torch 2.11's CUDA wheel, streaming an int64 into a message crashed (SIGSEGV in
// basic_ostream::_M_insert<long>) instead of raising.
inline void append(std::string& s, const char* part) { s += part; }
inline void append(std::string& s, const std::string& part) { s += part; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append(std::string& s, T part) {
  s += std::to_string(part);
}
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

// ---- scalar conversions of stored values to float ------------------------------------------
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

#if SPARSITY_AVX2
// ---- 4 stored values as a 128-bit float vector ----------------------------------------------
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
}
inline __m128 load4(const c10::Half* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ---- batch 1: one gathered dot product per active neuron -----------------------------------
// Four narrow column indices come from one 64-bit (int16) or 32-bit (uint8) load and are split
// with shifts: on the CPUs measured this beats both vgatherdps and per-element index loads.
template <typename I>
struct Cols4 {
  static inline void get(const I* c, int64_t* out) {
    for (int t = 0; t < 4; ++t) out[t] = static_cast<int64_t>(c[t]);
  }
};
template <>
struct Cols4<int16_t> {
  static inline void get(const int16_t* c, int64_t* out) {
    uint64_t q;
    std::memcpy(&q, c, 8);
    for (int t = 0; t < 4; ++t) out[t] = static_cast<int16_t>(q >> (16 * t));
  }
};
template <>
struct Cols4<uint8_t> {
  static inline void get(const uint8_t* c, int64_t* out) {
    uint32_t q;
    std::memcpy(&q, c, 4);
    for (int t = 0; t < 4; ++t) out[t] = (q >> (8 * t)) & 0xff;
  }
};

#if SPARSITY_AVX2
// values[j..j+3] * x[cols[j..j+3]]: the four inputs are loaded one by one into a 128-bit vector
// (on the Zen CPU measured, 256-bit vectors cost an extra lane insert per eight and were slower).
template <typename V, typename I>
inline __m128 gathered4(const V* v, const I* c, const float* x, __m128 acc) {
  int64_t i[4];
  Cols4<I>::get(c, i);
  return _mm_fmadd_ps(load4(v), _mm_set_ps(x[i[3]], x[i[2]], x[i[1]], x[i[0]]), acc);
}
#endif

// One row: eight products per step into two accumulators, then four, then one by one.
template <typename V, typename I>
inline float gathered_dot(const V* v, const I* c, const float* x, int64_t k) {
  int64_t j = 0;
  float total = 0.f;
#if SPARSITY_AVX2
  __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
  for (; j + 8 <= k; j += 8) {
    a0 = gathered4(v + j, c + j, x, a0);
    a1 = gathered4(v + j + 4, c + j + 4, x, a1);
  }
  if (j + 4 <= k) {
    a0 = gathered4(v + j, c + j, x, a0);
    j += 4;
  }
  total = hsum4(_mm_add_ps(a0, a1));
#endif
  float s0 = 0.f, s1 = 0.f;  // two chains: without AVX2 this loop is the whole row
  for (; j + 2 <= k; j += 2) {
    s0 += to_float(v[j]) * x[c[j]];
    s1 += to_float(v[j + 1]) * x[c[j + 1]];
  }
  if (j < k) s0 += to_float(v[j]) * x[c[j]];
  return total + s0 + s1;
}

// Two rows side by side (rows a and a + 1; the second's data follow the first's): their
// independent gathers interleave. On the 2-core Zen CPU measured (8 MiB of L3), two threads,
// this was 3-20% faster than one row at a time for packed weights of 2.5-5.8 MB, and 16-33%
// slower at 7.5 and 10 MB, which stream from memory; so gemv pairs rows only for weights of at
// most kPairedBytes.
template <typename V, typename I>
inline void gathered_dot2(const V* v, const I* c, const float* x, int64_t k, float* out) {
  const V* w = v + k;
  const I* d = c + k;
  int64_t j = 0;
  float ta = 0.f, tb = 0.f;
#if SPARSITY_AVX2
  __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
  __m128 b0 = _mm_setzero_ps(), b1 = _mm_setzero_ps();
  for (; j + 8 <= k; j += 8) {
    a0 = gathered4(v + j, c + j, x, a0);
    b0 = gathered4(w + j, d + j, x, b0);
    a1 = gathered4(v + j + 4, c + j + 4, x, a1);
    b1 = gathered4(w + j + 4, d + j + 4, x, b1);
  }
  if (j + 4 <= k) {
    a0 = gathered4(v + j, c + j, x, a0);
    b0 = gathered4(w + j, d + j, x, b0);
    j += 4;
  }
  ta = hsum4(_mm_add_ps(a0, a1));
  tb = hsum4(_mm_add_ps(b0, b1));
#endif
  for (; j < k; ++j) {
    ta += to_float(v[j]) * x[c[j]];
    tb += to_float(w[j]) * x[d[j]];
  }
  out[0] = ta;
  out[1] = tb;
}

constexpr int64_t kPairedBytes = 4 << 20;

template <typename V, typename I>
void gemv(const V* values, const I* cols, const int64_t* rows, int64_t active, int64_t k,
          const float* x, float* y, int64_t grain) {
  const bool paired =
      active * k * static_cast<int64_t>(sizeof(V) + sizeof(I)) <= kPairedBytes;
  // Tasks start on even rows so that a pair never straddles two tasks.
  const int64_t pairs = (active + 1) / 2;
  at::parallel_for(0, pairs, std::max<int64_t>(1, grain / 2), [&](int64_t lo, int64_t hi) {
    const int64_t end = std::min(active, 2 * hi);
    int64_t i = 2 * lo;
    if (paired) {
      for (; i + 2 <= end; i += 2) {
        float dot[2];
        gathered_dot2(values + i * k, cols + i * k, x, k, dot);
        y[rows ? rows[i] : i] += dot[0];
        y[rows ? rows[i + 1] : i + 1] += dot[1];
      }
    }
    for (; i < end; ++i) {
      y[rows ? rows[i] : i] += gathered_dot(values + i * k, cols + i * k, x, k);
    }
  });
}

// ---- batch >= 2: register tiles over the transposed, tiled input ----------------------------
// The input is stored as tiles [in, W] (W = 8 * NV lanes, contiguous per tile, so a tile never
// competes with itself for cache sets); each active neuron accumulates
// values[j] * tile[cols[j], :] into NV vector registers, unrolled U ways over j so that at
// least eight independent FMA chains hide the FMA latency.
constexpr int kMaxVectors = 8;

#if SPARSITY_AVX2
template <int NV, typename V, typename I>
inline void axpy_tile(const V* v, const I* c, int64_t k, const float* tile, float* out) {
  constexpr int U = NV >= 8 ? 1 : (NV >= 4 ? 2 : (NV >= 2 ? 4 : 8));
  constexpr int W = 8 * NV;
  __m256 acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < NV; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + U <= k; j += U) {
    for (int u = 0; u < U; ++u) {
      const __m256 w = _mm256_set1_ps(to_float(v[j + u]));
      const float* src = tile + static_cast<int64_t>(c[j + u]) * W;
      for (int t = 0; t < NV; ++t)
        acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 8 * t), acc[u][t]);
    }
  }
  for (; j < k; ++j) {
    const __m256 w = _mm256_set1_ps(to_float(v[j]));
    const float* src = tile + static_cast<int64_t>(c[j]) * W;
    for (int t = 0; t < NV; ++t)
      acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 8 * t), acc[0][t]);
  }
  for (int u = 1; u < U; ++u)
    for (int t = 0; t < NV; ++t) acc[0][t] = _mm256_add_ps(acc[0][t], acc[u][t]);
  for (int t = 0; t < NV; ++t) _mm256_storeu_ps(out + 8 * t, acc[0][t]);
}
#else
template <int NV, typename V, typename I>
inline void axpy_tile(const V* v, const I* c, int64_t k, const float* tile, float* out) {
  constexpr int W = 8 * NV;
  std::fill(out, out + W, 0.f);
  for (int64_t j = 0; j < k; ++j) {
    const float w = to_float(v[j]);
    const float* src = tile + static_cast<int64_t>(c[j]) * W;
    for (int b = 0; b < W; ++b) out[b] += w * src[b];
  }
}
#endif

// ---- 8 x 8 transposes for the two layout changes of the tiled path -----------------------
// load(r) gives row r (8 floats) of an 8 x 8 block; store(q, v) receives column q.
#if SPARSITY_AVX2
template <typename Load, typename Store>
inline void transpose8(Load&& load, Store&& store) {
  __m256 r[8], t[8];
  for (int q = 0; q < 8; ++q) r[q] = load(q);
  for (int q = 0; q < 8; q += 2) {
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 8; q += 4) {
    r[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
    r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
    r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
    r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
  }
  // r[0..3] hold columns {0,1,2,3} of rows 0-3 (low lanes) and 4-7... per 128-bit half.
  store(0, _mm256_permute2f128_ps(r[0], r[4], 0x20));
  store(1, _mm256_permute2f128_ps(r[1], r[5], 0x20));
  store(2, _mm256_permute2f128_ps(r[2], r[6], 0x20));
  store(3, _mm256_permute2f128_ps(r[3], r[7], 0x20));
  store(4, _mm256_permute2f128_ps(r[0], r[4], 0x31));
  store(5, _mm256_permute2f128_ps(r[1], r[5], 0x31));
  store(6, _mm256_permute2f128_ps(r[2], r[6], 0x31));
  store(7, _mm256_permute2f128_ps(r[3], r[7], 0x31));
}
#endif

template <int NV, typename V, typename I>
void gemm_tiles(const V* values, const I* cols, const int64_t* rows, int64_t active, int64_t k,
                const float* x, int64_t batch, int64_t in_features, const float* bias, float* y,
                int64_t out_features) {
  constexpr int W = 8 * NV;
  constexpr int64_t kBlock = 16;  // rows/columns per block of the two blocked transposes
  const int64_t tiles = (batch + W - 1) / W;
  const int64_t padded = tiles * W;
  // Tiled transpose, in cache blocks: xt[t, c, w] = x[t * W + w, c] (zero past the batch).
  // (Strided single-element passes would hit one cache set when a row is 4 KiB apart.)
  // Every element is written below, so neither buffer is zero-filled first (at batch 256 the
  // fill alone was megabytes of extra memory traffic per call).
  std::unique_ptr<float[]> xt(new float[static_cast<size_t>(tiles * in_features * W)]);
  const int64_t cblocks = (in_features + kBlock - 1) / kBlock;
  at::parallel_for(0, tiles * cblocks, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t tb = lo; tb < hi; ++tb) {
      const int64_t t = tb / cblocks, c0 = (tb % cblocks) * kBlock;
      const int64_t c1 = std::min(in_features, c0 + kBlock);
      float* dst = xt.get() + t * in_features * W;
      int64_t c = c0;
#if SPARSITY_AVX2
      // 8 x 8 blocks: 8 batch rows by 8 input columns become 8 columns by 8 lanes.
      for (; c + 8 <= c1; c += 8) {
        for (int w0 = 0; w0 < W; w0 += 8) {
          const int64_t b0 = t * W + w0;
          transpose8(
              [&](int r) {
                return b0 + r < batch ? _mm256_loadu_ps(x + (b0 + r) * in_features + c)
                                      : _mm256_setzero_ps();
              },
              [&](int q, __m256 v) { _mm256_storeu_ps(dst + (c + q) * W + w0, v); });
        }
      }
#endif
      for (int w = 0; w < W; ++w) {
        const int64_t b = t * W + w;
        const float* src = x + b * in_features;
        for (int64_t cc = c; cc < c1; ++cc) dst[cc * W + w] = b < batch ? src[cc] : 0.f;
      }
    }
  });
  // yt[i, b]: each active neuron's outputs for the whole (padded) batch, stored contiguously.
  std::unique_ptr<float[]> yt(new float[static_cast<size_t>(active * padded)]);
  // Enough rows per task to amortise a thread hand-off (about 32k multiply-adds).
  const int64_t grain = std::max<int64_t>(1, 32768 / (k * padded));
  at::parallel_for(0, active, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = 0; t < tiles; ++t) {
      const float* tile = xt.get() + t * in_features * W;
      for (int64_t i = lo; i < hi; ++i) {
        axpy_tile<NV>(values + i * k, cols + i * k, k, tile, yt.get() + i * padded + t * W);
      }
    }
  });
  // y[b, o] = bias[o] + yt[pos[o], b], where pos[o] is o's active row (-1: ablated, which gives
  // exactly the bias or 0). Blocks of 8 outputs by 8 batch rows are transposed in registers,
  // so every store is a full, contiguous vector.
  std::vector<int64_t> pos;
  if (rows) {
    pos.assign(static_cast<size_t>(out_features), -1);
    for (int64_t i = 0; i < active; ++i) pos[rows[i]] = i;
  }
  const auto row_of = [&](int64_t o) { return rows ? pos[o] : o; };
  const int64_t oblocks = (out_features + kBlock - 1) / kBlock;
  at::parallel_for(0, oblocks, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t ob = lo; ob < hi; ++ob) {
      const int64_t o0 = ob * kBlock, o1 = std::min(out_features, o0 + kBlock);
      int64_t o = o0;
#if SPARSITY_AVX2
      for (; o + 8 <= o1; o += 8) {
        const __m256 bv = bias ? _mm256_loadu_ps(bias + o) : _mm256_setzero_ps();
        int64_t src[8];
        for (int r = 0; r < 8; ++r) src[r] = row_of(o + r);
        for (int64_t b0 = 0; b0 < batch; b0 += 8) {
          transpose8(
              [&](int r) {
                return src[r] >= 0 ? _mm256_loadu_ps(yt.get() + src[r] * padded + b0)
                                   : _mm256_setzero_ps();
              },
              [&](int q, __m256 v) {
                if (b0 + q < batch) _mm256_storeu_ps(y + (b0 + q) * out_features + o,
                                                     _mm256_add_ps(bv, v));
              });
        }
      }
#endif
      for (; o < o1; ++o) {
        const int64_t i = row_of(o);
        const float bo = bias ? bias[o] : 0.f;
        for (int64_t b = 0; b < batch; ++b)
          y[b * out_features + o] = bo + (i >= 0 ? yt[i * padded + b] : 0.f);
      }
    }
  });
}

// The tile width: as many 8-lane vectors (at most kMaxVectors) as keep one [in, W] tile within
// about 1 MiB (resident in a shared L3), and no wider than the batch needs. Narrower tiles fit
// the L2 but stream the values once per tile: on a 2-core EPYC, (4096, 4096) at 90% sparsity
// and batch 256 ran 2x slower with 192 KiB tiles than with 1 MiB ones.
template <typename V, typename I>
void gemm(const V* values, const I* cols, const int64_t* rows, int64_t active, int64_t k,
          const float* x, int64_t batch, int64_t in_features, const float* bias, float* y,
          int64_t out_features) {
  const int64_t by_cache = (1024 * 1024) / (32 * std::max<int64_t>(in_features, 1));
  const int64_t by_batch = (batch + 7) / 8;
  const int nv = static_cast<int>(std::clamp<int64_t>(std::min(by_cache, by_batch), 1,
                                                      kMaxVectors));
  switch (nv) {
#define SPARSITY_CASE(N)                                                                    \
  case N:                                                                                   \
    return gemm_tiles<N>(values, cols, rows, active, k, x, batch, in_features, bias, y,     \
                         out_features);
    SPARSITY_CASE(1)
    SPARSITY_CASE(2)
    SPARSITY_CASE(3)
    SPARSITY_CASE(4)
    SPARSITY_CASE(5)
    SPARSITY_CASE(6)
    SPARSITY_CASE(7)
    default:
      return gemm_tiles<8>(values, cols, rows, active, k, x, batch, in_features, bias, y,
                           out_features);
#undef SPARSITY_CASE
  }
}

// ---- dispatch ------------------------------------------------------------------------------
template <typename F>
void with_index_type(const at::Tensor& cols, F&& f) {
  switch (cols.scalar_type()) {
    case at::kByte: return f(cols.const_data_ptr<uint8_t>());
    case at::kShort: return f(cols.const_data_ptr<int16_t>());
    case at::kInt: return f(cols.const_data_ptr<int32_t>());
    case at::kLong: return f(cols.const_data_ptr<int64_t>());
    default:
      TORCH_CHECK(false, message("condensed_linear: column indices must be uint8, int16, int32 "
                                 "or int64, got ", c10::toString(cols.scalar_type())));
  }
}

template <typename F>
void with_value_type(const at::Tensor& values, F&& f) {
  switch (values.scalar_type()) {
    case at::kFloat: return f(values.const_data_ptr<float>());
    case at::kBFloat16: return f(values.const_data_ptr<c10::BFloat16>());
    case at::kHalf: return f(values.const_data_ptr<c10::Half>());
    default:
      TORCH_CHECK(false, message("condensed_linear: values must be float32, bfloat16 or "
                                 "float16, got ", c10::toString(values.scalar_type())));
  }
}

// x: [batch, in] (any float dtype); values, cols: [active, k]; rows: [active] int64 or an
// empty tensor when every output neuron is active (row i is neuron i); bias: [out] or empty.
// Returns [batch, out] float32; the caller casts to the input's dtype.
at::Tensor condensed_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& cols,
                            const at::Tensor& rows, const at::Tensor& bias,
                            int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2 && cols.sizes() == values.sizes(),
              "condensed_linear: expected x [batch, in], values and cols [active, k]");
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && cols.device().is_cpu() &&
                  rows.device().is_cpu() && bias.device().is_cpu(),
              "condensed_linear: CPU only (x, values, cols, rows and bias)");
  const int64_t batch = x.size(0), in_features = x.size(1);
  const int64_t active = values.size(0), k = values.size(1);
  const bool all_rows = rows.numel() == 0 && active == out_features;
  TORCH_CHECK(all_rows || rows.numel() == active,
              message("condensed_linear: rows must list the ", active, " active neurons"));
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == out_features,
              message("condensed_linear: bias has ", bias.numel(), " elements for ",
                      out_features, " output neurons"));
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = cols.contiguous();
  const at::Tensor rws = all_rows ? rows : rows.to(at::kLong).contiguous();
  const int64_t* rp = all_rows ? nullptr : rws.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < (all_rows ? 0 : active); ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < out_features,
                message("condensed_linear: active row ", rp[i], " is outside 0..",
                        out_features - 1));
  }

  at::Tensor y = at::empty({batch, out_features}, x.options().dtype(at::kFloat));
  float* yp = y.mutable_data_ptr<float>();
  const at::Tensor b = bias.numel() > 0 ? bias.to(at::kFloat).contiguous() : bias;
  const float* bp = bias.numel() > 0 ? b.const_data_ptr<float>() : nullptr;
  const bool tiled = batch >= 2 && active > 0 && k > 0;  // writes every output itself
  if (!tiled) {
    for (int64_t r = 0; r < batch; ++r) {
      if (bp) {
        std::memcpy(yp + r * out_features, bp, out_features * sizeof(float));
      } else {
        std::fill(yp + r * out_features, yp + (r + 1) * out_features, 0.f);
      }
    }
  }
  if (batch == 0 || active == 0 || k == 0) return y;

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  if (batch == 1) {
    // Enough rows per task to amortise a thread hand-off (about 32k multiply-adds).
    const int64_t grain = std::max<int64_t>(1, 32768 / k);
    with_value_type(vals, [&](auto vp) {
      with_index_type(idx, [&](auto cp) { gemv(vp, cp, rp, active, k, xp, yp, grain); });
    });
    return y;
  }
  with_value_type(vals, [&](auto vp) {
    with_index_type(idx, [&](auto cp) {
      gemm(vp, cp, rp, active, k, xp, batch, in_features, bp, yp, out_features);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(sparsity_formats, m) {
  m.def("condensed_linear(Tensor x, Tensor values, Tensor cols, Tensor rows, Tensor bias, "
        "int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsity_formats, CPU, m) { m.impl("condensed_linear", condensed_linear); }

// What the formats call: a plain Python binding (through the dispatcher's boxed path, torch.ops,
// a call cost about 5 us more: a twelfth of a batch-1 (3072, 768) layer here) that also makes
// the checks the Python caller would otherwise make (about 2 us more there). It returns None
// where the kernel does not apply, and the caller then takes its PyTorch path: x not [batch,
// in_features], not on the CPU, or not in the values' dtype; a dtype the kernel does not read;
// an autograd graph to record (the kernel has no backward); or anything that needs the
// dispatcher this binding skips (below). Otherwise the output, in x's dtype. Argument errors
// raise RuntimeError with the message alone; the GIL is released while the kernel runs.
//
// What only the dispatcher sees: torch.jit.trace (the Tracer key), Python dispatch modes and
// tensor subclasses (FakeTensorMode, make_fx, __torch_dispatch__: the Python keys), functorch's
// transforms (vmap, grad) and functionalization. Under any of them, or for a tensor without
// storage (a wrapper), the PyTorch path runs, which they all understand.
const c10::DispatchKeySet kDispatcherOnly({
    c10::DispatchKey::Tracer,
    c10::DispatchKey::Python,
    c10::DispatchKey::PythonTLSSnapshot,
    c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
    c10::DispatchKey::FuncTorchDynamicLayerBackMode,
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::Functionalize,
});

inline bool plain(const at::Tensor& t) {
  return !t.defined() || (t.layout() == at::kStrided && t.has_storage() &&
                          (t.key_set() & kDispatcherOnly).empty());
}

static std::optional<at::Tensor> condensed_linear_eager(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& cols, const at::Tensor& rows,
    const at::Tensor& bias, int64_t in_features, int64_t out_features) {
  const auto dtype = x.scalar_type();
  if (x.dim() != 2 || x.size(1) != in_features || !x.device().is_cpu() ||
      !values.device().is_cpu() || dtype != values.scalar_type() ||
      !(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf)) {
    return std::nullopt;
  }
  if (!(c10::impl::tls_local_dispatch_key_set().included_ & kDispatcherOnly).empty() ||
      !plain(x) || !plain(values) || !plain(cols) || !plain(rows) || !plain(bias)) {
    return std::nullopt;
  }
  if (c10::GradMode::is_enabled() &&
      (x.requires_grad() || values.requires_grad() || (bias.defined() && bias.requires_grad()))) {
    return std::nullopt;
  }
  try {
    at::Tensor y = condensed_linear(x, values, cols, rows, bias, out_features);
    return dtype == at::kFloat ? y : y.to(dtype);
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("condensed_linear", &condensed_linear_eager,
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
