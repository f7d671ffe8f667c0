// CPU kernels of compact sparse layers (sparsity_core.compact): the forward product and both
// gradients of a layer holding only its active weights in CSR order over output neurons.
//
//   forward_t(xt [in, B], values, cols, row_ptr, bias, out)      -> yt [out, B]
//   grad_input_t(gyt [out, B], values, cols, row_ptr, in)        -> gxt [in, B]
//   grad_values_t(gyt [out, B], xt [in, B], cols, row_ptr, cap)  -> grad [cap] (0 past nnz)
//
// Activations are transposed (batch innermost), so each stored weight multiplies a contiguous
// run of the batch: the forward accumulates values[j] * xt[cols[j], tile] into registers per
// output neuron, the input gradient adds values[j] * gyt[r, tile] into gxt[cols[j], tile]
// (threads split the rows, each into its own buffer, summed at the end), and the value
// gradient is a dot product over the batch per stored weight.
//
// The loops are compiled once per instruction set (AVX-512, AVX2+FMA, and the portable x86-64 /
// other baseline) from compact_body.inc, and the widest one the CPU has is chosen at load time
// (set_isa() picks another, for side-by-side measurements). float32 and float64; int16 or int32
// column indices. Rows are split over torch's intra-op threads (at::parallel_for).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include "isa_select.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SC_X86 1
#else
#define SC_X86 0
#endif

#if SC_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace isa_avx512 {
constexpr int64_t kVecBytes = 64;
#include "compact_body.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
constexpr int64_t kVecBytes = 32;
#include "compact_body.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_portable {
constexpr int64_t kVecBytes = 16;
#include "compact_body.inc"
}  // namespace isa_portable

namespace {

template <typename T, typename I>
using ForwardFn = void (*)(const T*, int64_t, int64_t, const T*, const I*, const int64_t*,
                           const T*, T*, int64_t, int64_t);
template <typename T, typename I>
using GradInputFn = void (*)(const T*, int64_t, int64_t, const T*, const I*, const int64_t*, T*,
                             int64_t, int64_t, int64_t, int64_t);
template <typename T, typename I>
using GradValuesFn = void (*)(const T*, const T*, int64_t, int64_t, const I*, const int64_t*, T*,
                              int64_t, int64_t);

template <typename T, typename I>
struct Kernels {
  ForwardFn<T, I> forward;
  GradInputFn<T, I> grad_input;
  GradValuesFn<T, I> grad_values;
};

struct Table {
  Kernels<float, int16_t> f32_i16;
  Kernels<float, int32_t> f32_i32;
  Kernels<double, int16_t> f64_i16;
  Kernels<double, int32_t> f64_i32;
};

#define SC_ENTRY(NS, SUFFIX) {NS::forward_##SUFFIX, NS::grad_input_##SUFFIX, NS::grad_values_##SUFFIX}
#define SC_ISA_TABLE(NS) \
  Table { SC_ENTRY(NS, f32_i16), SC_ENTRY(NS, f32_i32), SC_ENTRY(NS, f64_i16), SC_ENTRY(NS, f64_i32) }

std::vector<std::string> available() { return sparsity_isa::available(); }

Table table_for(const std::string& isa) {
#if SC_X86
  if (isa == "avx512") return SC_ISA_TABLE(isa_avx512);
  if (isa == "avx2") return SC_ISA_TABLE(isa_avx2);
#endif
  return SC_ISA_TABLE(isa_portable);
}

std::string current_isa = available().front();
Table current = table_for(current_isa);

void set_isa(const std::string& isa) {
  sparsity_isa::require(isa, "sparsity_core compact kernels");
  current_isa = isa;
  current = table_for(isa);
}

std::string get_isa() { return current_isa; }

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("sparsity_core compact kernels: " + what);
}

void check_layout(const at::Tensor& values, const at::Tensor& cols, const at::Tensor& row_ptr,
                  int64_t rows) {
  check(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  check(cols.dim() == 1 && cols.is_contiguous() && cols.numel() == values.numel(),
        "cols must be contiguous and as long as values");
  check(cols.scalar_type() == at::kShort || cols.scalar_type() == at::kInt,
        "cols must be int16 or int32");
  check(row_ptr.dim() == 1 && row_ptr.is_contiguous() && row_ptr.scalar_type() == at::kLong &&
            row_ptr.numel() == rows + 1,
        "row_ptr must be a contiguous int64 tensor of rows + 1 entries");
  check(values.device().is_cpu() && cols.device().is_cpu() && row_ptr.device().is_cpu(),
        "tensors must be on the CPU");
}

void check_act(const at::Tensor& t, const at::Tensor& values, const char* name) {
  check(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
        std::string(name) + " must be a contiguous 2-D CPU tensor [features, batch]");
  check(t.scalar_type() == values.scalar_type(),
        std::string(name) + " must have the dtype of values");
}

template <typename Fn>
void dispatch(const at::Tensor& values, const at::Tensor& cols, Fn&& fn) {
  const bool narrow = cols.scalar_type() == at::kShort;
  switch (values.scalar_type()) {
    case at::kFloat:
      narrow ? fn(float{}, int16_t{}, current.f32_i16) : fn(float{}, int32_t{}, current.f32_i32);
      break;
    case at::kDouble:
      narrow ? fn(double{}, int16_t{}, current.f64_i16) : fn(double{}, int32_t{}, current.f64_i32);
      break;
    default:
      check(false, "values must be float32 or float64");
  }
}

// Rows split so each chunk holds about the same number of stored weights.
int64_t grain_rows(int64_t rows, int64_t nnz, int64_t batch) {
  const int64_t work = std::max<int64_t>(1, nnz) * std::max<int64_t>(1, batch);
  const int64_t per_row = std::max<int64_t>(1, work / std::max<int64_t>(1, rows));
  return std::max<int64_t>(1, 32768 / per_row);
}

at::Tensor forward_t(const at::Tensor& xt, const at::Tensor& values, const at::Tensor& cols,
                     const at::Tensor& row_ptr, const at::Tensor& bias, int64_t out_features) {
  check_layout(values, cols, row_ptr, out_features);
  check_act(xt, values, "xt");
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    check(bias.dim() == 1 && bias.numel() == out_features && bias.is_contiguous() &&
              bias.scalar_type() == values.scalar_type(),
          "bias must be contiguous, of out_features entries and the dtype of values");
  }
  const int64_t in_features = xt.size(0);
  const int64_t batch = xt.size(1);
  at::Tensor yt = at::empty({out_features, batch}, values.options());
  const int64_t nnz = row_ptr[out_features].item<int64_t>();
  dispatch(values, cols, [&](auto t, auto i, const auto& k) {
    using T = decltype(t);
    using I = decltype(i);
    const T* x = xt.data_ptr<T>();
    const T* v = values.data_ptr<T>();
    const I* c = cols.data_ptr<I>();
    const int64_t* p = row_ptr.data_ptr<int64_t>();
    const T* b = has_bias ? bias.data_ptr<T>() : nullptr;
    T* y = yt.data_ptr<T>();
    at::parallel_for(0, out_features, grain_rows(out_features, nnz, batch),
                     [&](int64_t lo, int64_t hi) { k.forward(x, in_features, batch, v, c, p, b, y, lo, hi); });
  });
  return yt;
}

at::Tensor grad_input_t(const at::Tensor& gyt, const at::Tensor& values, const at::Tensor& cols,
                        const at::Tensor& row_ptr, int64_t in_features) {
  const int64_t out_features = row_ptr.numel() - 1;
  check_layout(values, cols, row_ptr, out_features);
  check_act(gyt, values, "gyt");
  check(gyt.size(0) == out_features, "gyt must have out_features rows");
  const int64_t batch = gyt.size(1);
  const int64_t nnz = row_ptr[out_features].item<int64_t>();
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), nnz * batch / 65536 + 1));
  // A wide batch (4 units a thread or more; below, the split by rows measured faster) is split
  // by columns: each thread adds every row's products into its own columns of one buffer, in
  // units of kColumnUnit (a whole number of every ISA's tiles). Otherwise rows are split into
  // one contiguous range per thread, each adding into its own buffer (as many buffers as keep
  // the scratch within 256 MiB, at least one), and the buffers are summed at the end.
  constexpr int64_t kColumnUnit = 128;
  const int64_t units = batch / kColumnUnit;
  const bool by_columns = threads > 1 && units >= 4 * threads;
  const int64_t buffer_bytes = std::max<int64_t>(1, in_features * batch * values.element_size());
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{256} << 20) / buffer_bytes);
  const int64_t parts = by_columns ? threads : std::min(threads, by_memory);
  at::Tensor buffers = by_columns ? at::empty({1, in_features, batch}, values.options())
                                  : at::zeros({parts, in_features, batch}, values.options());
  std::vector<int64_t> bounds(parts + 1, out_features);
  if (!by_columns) {
    const int64_t* p = row_ptr.data_ptr<int64_t>();
    bounds[0] = 0;
    int64_t r = 0;
    for (int64_t t = 1; t < parts; ++t) {
      const int64_t goal = nnz * t / parts;
      while (r < out_features && p[r] < goal) ++r;
      bounds[t] = r;
    }
  }
  dispatch(values, cols, [&](auto t, auto i, const auto& k) {
    using T = decltype(t);
    using I = decltype(i);
    const T* g = gyt.data_ptr<T>();
    const T* v = values.data_ptr<T>();
    const I* c = cols.data_ptr<I>();
    const int64_t* p = row_ptr.data_ptr<int64_t>();
    T* base = buffers.data_ptr<T>();
    at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t part = lo; part < hi; ++part) {
        if (!by_columns) {
          k.grad_input(g, in_features, batch, v, c, p, base + part * in_features * batch,
                       bounds[part], bounds[part + 1], 0, batch);
          continue;
        }
        const int64_t c0 = units * part / parts * kColumnUnit;
        const int64_t c1 = part + 1 == parts ? batch : units * (part + 1) / parts * kColumnUnit;
        for (int64_t row = 0; row < in_features; ++row) {
          std::fill(base + row * batch + c0, base + row * batch + c1, T(0));
        }
        k.grad_input(g, in_features, batch, v, c, p, base, 0, out_features, c0, c1);
      }
    });
  });
  return buffers.size(0) == 1 ? buffers[0] : buffers.sum(0);
}

at::Tensor grad_values_t(const at::Tensor& gyt, const at::Tensor& xt, const at::Tensor& cols,
                         const at::Tensor& row_ptr, const at::Tensor& values) {
  const int64_t out_features = row_ptr.numel() - 1;
  check_layout(values, cols, row_ptr, out_features);
  check_act(gyt, values, "gyt");
  check_act(xt, values, "xt");
  check(gyt.size(0) == out_features && gyt.size(1) == xt.size(1),
        "gyt must be [out_features, batch] and xt [in_features, batch]");
  const int64_t batch = xt.size(1);
  const int64_t nnz = row_ptr[out_features].item<int64_t>();
  at::Tensor grad = at::zeros_like(values);
  dispatch(values, cols, [&](auto t, auto i, const auto& k) {
    using T = decltype(t);
    using I = decltype(i);
    const T* g = gyt.data_ptr<T>();
    const T* x = xt.data_ptr<T>();
    const I* c = cols.data_ptr<I>();
    const int64_t* p = row_ptr.data_ptr<int64_t>();
    T* out = grad.data_ptr<T>();
    at::parallel_for(0, out_features, grain_rows(out_features, nnz, batch),
                     [&](int64_t lo, int64_t hi) { k.grad_values(g, x, xt.size(0), batch, c, p, out, lo, hi); });
  });
  return grad;
}

// How many threads at::parallel_for runs a range of `tasks` single-task chunks on. It is 1 when
// the library was built without OpenMP, whatever at::get_num_threads() says (the ATen header
// parallelises only under _OPENMP): the test suite checks it.
int64_t threads_used(int64_t tasks) {
  std::vector<int> seen(static_cast<size_t>(std::max<int64_t>(1, tasks)), -1);
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) seen[t] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsity_core compact-layer CPU kernels";
  m.def("forward_t", &forward_t);
  m.def("grad_input_t", &grad_input_t);
  m.def("grad_values_t", &grad_values_t);
  m.def("available_isas", &available);
  m.def("set_isa", &set_isa);
  m.def("isa", &get_isa);
  m.def("threads_used", &threads_used);
}
