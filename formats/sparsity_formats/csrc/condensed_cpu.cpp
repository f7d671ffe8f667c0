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

#include "isa_select.h"  // sparsity_core/csrc

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSITY_X86 1
#else
#define SPARSITY_X86 0
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

}  // namespace

// ---- the kernels, once per instruction set (chosen at load time) ----------------------------
#if SPARSITY_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
#define SPARSITY_AVX2 1
#define SPARSITY_AVX512 1
#include "condensed_body.inc"
#undef SPARSITY_AVX2
#undef SPARSITY_AVX512
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define SPARSITY_AVX2 1
#define SPARSITY_AVX512 0
#include "condensed_body.inc"
#undef SPARSITY_AVX2
#undef SPARSITY_AVX512
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_portable {
#define SPARSITY_AVX2 0
#define SPARSITY_AVX512 0
#include "condensed_body.inc"
#undef SPARSITY_AVX2
#undef SPARSITY_AVX512
}  // namespace isa_portable

namespace {

using LinearImpl = void (*)(const at::Tensor&, const at::Tensor&, const int64_t*, int64_t, int64_t,
                            const float*, int64_t, int64_t, const float*, float*, int64_t);

std::vector<std::string> available_isas() { return sparsity_isa::available(); }

LinearImpl impl_for(const std::string& isa) {
#if SPARSITY_X86
  if (isa == "avx512") return isa_avx512::linear_impl;
  if (isa == "avx2") return isa_avx2::linear_impl;
#endif
  return isa_portable::linear_impl;
}

std::string current_isa = available_isas().front();
LinearImpl current_impl = impl_for(current_isa);

void set_isa(const std::string& isa) {
  sparsity_isa::require(isa, "condensed_linear");
  current_isa = isa;
  current_impl = impl_for(isa);
}

std::string get_isa() { return current_isa; }

// ---- dispatch ------------------------------------------------------------------------------
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
  current_impl(vals, idx, rp, active, k, xp, batch, in_features, bp, yp, out_features);
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
  m.def("available_isas", &available_isas);
  m.def("set_isa", &set_isa);
  m.def("isa", &get_isa);
}
