// LayerNorm, RMSNorm and their Add & Norm for lightllm._C: the TORCH_LIBRARY schemas, input checks
// and the CPU kernels. They compute exactly what the Triton launchers of kernels/norm.py
// compute; one set of row kernels serves both norms (the template flag kRms).
//
// Ops (namespace lightllm; fake tensors and autograd are registered from Python):
//   layer_norm_fwd_cpu(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)
//       -> (y, s, mean, rstd)
//   layer_norm_bwd_cpu(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? ds,
//                      bool need_dw, bool need_db) -> (dx, dw, db)
//   rms_norm_fwd_cpu(Tensor x, Tensor? residual, Tensor? weight, float eps,
//                    bool cast_before_weight) -> (y, s, rstd)
//   rms_norm_bwd_cpu(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? ds, bool need_dw)
//       -> (dx, dw)
// x, residual, dy, ds: (M, N) of one float dtype, any strides; weight, bias: (N,) of any float
// dtype. y, s, dx: contiguous, x's dtype; s is empty (0,) without a residual. mean, rstd: fp32 (M,).
// dw, db: fp32 (N,), or empty (0,) when not asked for. RMSNorm: y = x * rstd * w with
// rstd = 1 / sqrt(mean(x^2) + eps); with cast_before_weight x * rstd is rounded to x's dtype before
// the weight multiplies it (Hugging Face's LlamaRMSNorm) and y has dtype promote(x, weight).
//
// Forward, per row (rows in parallel): pass 1 reads x (+ residual), forms s = x + r rounded to x's
// dtype (stored), keeps it as fp32 (in a scratch row for fp16/bf16) and sums it; pass 2 the
// centred sum of squares (two passes, never E[x^2] - E[x]^2); pass 3 y = (s - mean) * rstd * w + b
// while the next row is prefetched. Passes 2 and 3 read the row from L1/L2. Traffic: one read of x
// and the residual, one write of y and s, 8 bytes of statistics per row. RMSNorm sums the squares
// in pass 1 and skips pass 2 (a row whose squares overflow fp32 is summed again, scaled).
//
// Backward, with xhat = (x - mean) * rstd and g = w * dy: pass 1 reads x and dy, reduces
// sum(xhat * g) and sum(g) and adds dy * xhat, dy to the dw/db partial row of the row's chunk;
// pass 2 writes dx = rstd * (g - xhat * mean(g xhat) - mean(g)) (+ ds), recomputing xhat and g
// from the cached row. RMSNorm: mean = 0 and no mean(g) term. Traffic: one read of x, dy (and ds), one write of dx. Rows are cut into
// chunks by a rule that depends on (M, N) only, and the chunks' fp32 partials are summed in chunk
// order, so dw and db have the same bits whatever the thread count.
//
// The row kernels (norm_cpu.h, on the vectors of cpu_vec.h) are compiled three times, for
// AVX-512, AVX2 and the x86-64 baseline, and the best one the CPU supports runs (the environment
// variable LIGHTLLM_CPU_ISA=avx2|baseline caps it, for tests). Their results can differ in the
// last bit (FMA contraction), never with the thread count.

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace lightllm {
namespace {

// A task of at::parallel_for handles at least this many elements, so tasks are never tiny. (With
// ATen's OpenMP backend, parallel_for's parallel region is inlined here: the rows run on
// torch.get_num_threads() threads only when this file is compiled with -fopenmp, else on one.)
constexpr int64_t kGrainElems = 1 << 15;
// The backward cuts rows into at most this many chunks, each at least kGrainElems elements.
constexpr int64_t kMaxChunks = 64;

// Outputs start as NaN when LIGHTLLM_POISON_OUTPUTS=1 (the tests set it), so an element a kernel
// forgets to write fails the parity check instead of passing on leftover memory.
bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("LIGHTLLM_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && out.numel() > 0) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", name,
              " must have dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

// x, or a tensor of x's shape and dtype (residual, dy, ds).
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  const char* x_name) {
  check_cpu_float(op, name, t);
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have ", x_name, "'s shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have ", x_name,
              "'s dtype (", x.scalar_type(), "), got ", t.scalar_type());
}

// A (N,) parameter as a contiguous fp32 tensor (nullptr data when absent).
at::Tensor param_as_float(const char* op, const char* name, const std::optional<at::Tensor>& p,
                          int64_t n) {
  if (!p.has_value()) return at::Tensor();
  check_cpu_float(op, name, *p);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, op, ": ", name, " must have shape (", n,
              ",) (x's last dim), got ", p->sizes());
  return p->to(at::kFloat).contiguous();
}

// (M, N) rows that are contiguous within a row, with their row stride (which may be 0): the
// tensor itself where it is, else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t* row_stride) {
  at::Tensor rows = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  *row_stride = rows.size(0) <= 1 ? 0 : rows.stride(0);
  return rows;
}

template <typename T>
const T* data(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<const T*>(t.data_ptr()) : nullptr;
}

template <typename T>
T* mutable_data(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      return f(c10::BFloat16{});
  }
}

// ------------------------------------------------------------------------------------------------
// The row kernels, once per instruction set
// ------------------------------------------------------------------------------------------------

// Row r of an input starts at r * stride (0 is fine); outputs are contiguous rows of n. TY, the
// output's type, is T except for RMSNorm's cast-before-weight beside an fp32 weight (float).
template <typename T, typename TY>
struct FwdArgs {
  const T* x;
  const T* r;  // residual, or nullptr
  const float* w;  // fp32 weight, or nullptr
  const float* b;  // fp32 bias, or nullptr (always for RMSNorm)
  TY* y;
  T* s;  // x + residual, or nullptr
  float* mean;  // nullptr for RMSNorm
  float* rstd;
  int64_t n, x_stride, r_stride;
  float eps;
  bool cast_before_weight;  // RMSNorm: round x * rstd to T before the weight
};

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* x;
  const float* w;  // fp32 weight, or nullptr
  const float* mean;  // nullptr for RMSNorm
  const float* rstd;
  const T* ds;  // gradient of the returned sum, or nullptr
  T* dx;
  float* dw;  // (chunks, n) fp32 partials, or nullptr when not needed
  float* db;
  int64_t n, dy_stride, x_stride, ds_stride, mean_stride, rstd_stride;
};

}  // namespace
}  // namespace lightllm

// Each region compiles the same kernels for one target (GCC's function-level target options, so
// the rest of the extension keeps the baseline flags).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define LIGHTLLM_VEC_ISA 512
namespace lightllm::avx512 {
#include "norm_cpu.h"
}  // namespace lightllm::avx512
#undef LIGHTLLM_VEC_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LIGHTLLM_VEC_ISA 2
namespace lightllm::avx2 {
#include "norm_cpu.h"
}  // namespace lightllm::avx2
#undef LIGHTLLM_VEC_ISA
#pragma GCC pop_options

#define LIGHTLLM_VEC_ISA 0
namespace lightllm::baseline {
#include "norm_cpu.h"
}  // namespace lightllm::baseline
#undef LIGHTLLM_VEC_ISA

namespace lightllm {
namespace {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// The best instruction set this CPU has, capped by LIGHTLLM_CPU_ISA=avx2|baseline; read once.
CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    CpuIsa best = CpuIsa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = CpuIsa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        best = CpuIsa::kAvx512;
      }
    }
    const char* cap = std::getenv("LIGHTLLM_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return CpuIsa::kBaseline;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(best, CpuIsa::kAvx2);
    return best;
  }();
  return isa;
}

// Returns `call` made on the kernels of the selected instruction set (variadic: the call's
// template arguments hold commas).
#define LIGHTLLM_ON_CPU_ISA(...)                   \
  switch (cpu_isa()) {                             \
    case CpuIsa::kAvx512:                          \
      return ::lightllm::avx512::__VA_ARGS__;      \
    case CpuIsa::kAvx2:                            \
      return ::lightllm::avx2::__VA_ARGS__;        \
    default:                                       \
      return ::lightllm::baseline::__VA_ARGS__;    \
  }

template <typename T, typename TY, bool kRms>
void fwd_rows(const FwdArgs<T, TY>& a, int64_t begin, int64_t end, float* scratch) {
  LIGHTLLM_ON_CPU_ISA(layer_norm_fwd_rows<T, TY, kRms>(a, begin, end, scratch))
}

template <typename T, bool kRms>
void bwd_rows(const BwdArgs<T>& a, int64_t begin, int64_t end, float* dw, float* db) {
  LIGHTLLM_ON_CPU_ISA(layer_norm_bwd_rows<T, kRms>(a, begin, end, dw, db))
}

void sum_partials(float* out, const float* partial, int64_t chunks, int64_t n, int64_t begin,
                  int64_t end) {
  LIGHTLLM_ON_CPU_ISA(sum_partials(out, partial, chunks, n, begin, end))
}

#undef LIGHTLLM_ON_CPU_ISA

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// Either norm's forward (kRms: RMSNorm, no bias, mean left empty): (y, s, mean, rstd).
template <bool kRms>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool cast_before_weight) {
  check_cpu_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, features), got shape ", x.sizes());
  if (residual.has_value()) check_like_x(op, "residual", *residual, x, "x");
  const int64_t m = x.size(0), n = x.size(1);
  const at::Tensor w = param_as_float(op, "weight", weight, n);
  const at::Tensor b = param_as_float(op, "bias", bias, n);

  const at::TensorOptions opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const at::TensorOptions f32 = opts.dtype(at::kFloat);
  // LlamaRMSNorm's `weight * normed.to(x.dtype)` has the promoted dtype.
  const at::ScalarType y_type = cast_before_weight && weight.has_value()
                                    ? c10::promoteTypes(x.scalar_type(), weight->scalar_type())
                                    : x.scalar_type();
  at::Tensor y = empty_output({m, n}, opts.dtype(y_type));
  at::Tensor s = residual.has_value() ? empty_output({m, n}, opts) : at::empty({0}, opts);
  at::Tensor mean = kRms ? at::empty({0}, f32) : empty_output({m}, f32);
  at::Tensor rstd = empty_output({m}, f32);
  if (m == 0) return {y, s, mean, rstd};
  if (n == 0) {  // mean = 0 / 0, as the Triton kernel computes it
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, s, mean, rstd};
  }

  int64_t x_stride = 0, r_stride = 0;
  const at::Tensor xr = as_rows(x, &x_stride);
  const at::Tensor rr = residual.has_value() ? as_rows(*residual, &r_stride) : at::Tensor();
  const auto run = [&](auto x_tag, auto y_tag) {
    using T = decltype(x_tag);
    using TY = decltype(y_tag);
    const FwdArgs<T, TY> a{data<T>(xr), data<T>(rr), data<float>(w), data<float>(b),
                           mutable_data<TY>(y), mutable_data<T>(s), mutable_data<float>(mean),
                           mutable_data<float>(rstd), n, x_stride, r_stride,
                           static_cast<float>(eps), cast_before_weight};
    at::parallel_for(0, m, std::max<int64_t>(1, kGrainElems / n), [&](int64_t b0, int64_t e0) {
      std::vector<float> scratch(std::is_same_v<T, float> ? 0 : n);
      fwd_rows<T, TY, kRms>(a, b0, e0, scratch.data());
    });
  };
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kRms && !std::is_same_v<T, float>) {
      if (y_type == at::kFloat) return run(tag, float{});
    }
    run(tag, tag);
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return norm_fwd_cpu<false>("lightllm::layer_norm_fwd_cpu", x, residual, weight, bias, eps,
                             false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, double eps, bool cast_before_weight) {
  auto [y, s, mean, rstd] = norm_fwd_cpu<true>("lightllm::rms_norm_fwd_cpu", x, residual, weight,
                                               std::nullopt, eps, cast_before_weight);
  return {y, s, rstd};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// A saved statistic: fp32 (m,) on the CPU.
void check_stat(const char* op, const char* name, const at::Tensor& stat, int64_t m) {
  TORCH_CHECK(stat.layout() == at::kStrided && stat.device().is_cpu(), op, ": ", name,
              " must be a strided CPU tensor, got one on ", stat.device());
  TORCH_CHECK(stat.scalar_type() == at::kFloat, op, ": ", name, " must have dtype float32, got ",
              stat.scalar_type());
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == m, op, ": ", name, " must have shape (", m,
              ",) (x's rows), got ", stat.sizes());
}

// Either norm's backward (kRms: RMSNorm, no mean, need_db false): (dx, dw, db).
template <bool kRms>
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const char* op, const at::Tensor& dy, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& ds, bool need_dw, bool need_db) {
  check_cpu_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, features), got shape ", x.sizes());
  check_like_x(op, "dy", dy, x, "x");
  if (ds.has_value()) check_like_x(op, "ds", *ds, x, "x");
  const int64_t m = x.size(0), n = x.size(1);
  if constexpr (!kRms) check_stat(op, "mean", mean, m);
  check_stat(op, "rstd", rstd, m);
  const at::Tensor w = param_as_float(op, "weight", weight, n);

  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = empty_output({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw = need_dw ? empty_output({n}, f32) : at::empty({0}, f32);
  at::Tensor db = need_db ? empty_output({n}, f32) : at::empty({0}, f32);
  if (m == 0 || n == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }

  // Chunks of whole rows, fixed by (m, n) alone: their count never depends on the threads.
  const int64_t rows_per_chunk =
      std::max((m + kMaxChunks - 1) / kMaxChunks, (kGrainElems + n - 1) / n);
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  // One chunk accumulates straight into dw / db; more get a partial row each.
  at::Tensor dw_partial = need_dw && chunks > 1 ? at::empty({chunks, n}, f32) : dw;
  at::Tensor db_partial = need_db && chunks > 1 ? at::empty({chunks, n}, f32) : db;

  int64_t dy_stride = 0, x_stride = 0, ds_stride = 0;
  const at::Tensor dyr = as_rows(dy, &dy_stride);
  const at::Tensor xr = as_rows(x, &x_stride);
  const at::Tensor dsr = ds.has_value() ? as_rows(*ds, &ds_stride) : at::Tensor();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const BwdArgs<T> a{data<T>(dyr), data<T>(xr), data<float>(w),
                       kRms ? nullptr : data<float>(mean), data<float>(rstd), data<T>(dsr),
                       mutable_data<T>(dx), need_dw ? mutable_data<float>(dw_partial) : nullptr,
                       need_db ? mutable_data<float>(db_partial) : nullptr, n, dy_stride,
                       x_stride, ds_stride, kRms ? 0 : mean.stride(0), rstd.stride(0)};
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* dwc = a.dw ? a.dw + c * n : nullptr;
        float* dbc = a.db ? a.db + c * n : nullptr;
        if (dwc) std::fill(dwc, dwc + n, 0.0f);
        if (dbc) std::fill(dbc, dbc + n, 0.0f);
        bwd_rows<T, kRms>(a, c * rows_per_chunk, std::min(m, (c + 1) * rows_per_chunk), dwc, dbc);
      }
    });
  });
  // dw, db = the partial rows summed in chunk order, columns in parallel.
  const auto reduce = [&](at::Tensor& out, const at::Tensor& partial) {
    const float* p = data<float>(partial);
    float* o = mutable_data<float>(out);
    at::parallel_for(0, n, std::max<int64_t>(64, kGrainElems / chunks),
                     [&](int64_t j0, int64_t j1) { sum_partials(o, p, chunks, n, j0, j1); });
  };
  if (need_dw && chunks > 1) reduce(dw, dw_partial);
  if (need_db && chunks > 1) reduce(db, db_partial);
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& ds,
    bool need_dw, bool need_db) {
  return norm_bwd_cpu<false>("lightllm::layer_norm_bwd_cpu", dy, x, weight, mean, rstd, ds,
                             need_dw, need_db);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& rstd,
                                                    const std::optional<at::Tensor>& ds,
                                                    bool need_dw) {
  auto [dx, dw, db] = norm_bwd_cpu<true>("lightllm::rms_norm_bwd_cpu", dy, x, weight, at::Tensor(),
                                         rstd, ds, need_dw, false);
  return {dx, dw};
}

}  // namespace
}  // namespace lightllm

// softmax.cpp holds the namespace's one defining TORCH_LIBRARY block; these are a fragment.
TORCH_LIBRARY_FRAGMENT(lightllm, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "layer_norm_fwd_cpu(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "layer_norm_bwd_cpu(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
      " Tensor? ds, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "rms_norm_fwd_cpu(Tensor x, Tensor? residual, Tensor? weight, float eps,"
      " bool cast_before_weight) -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "rms_norm_bwd_cpu(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? ds,"
      " bool need_dw) -> (Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(lightllm, CPU, m) {
  m.impl("layer_norm_fwd_cpu", &lightllm::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd_cpu", &lightllm::layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd_cpu", &lightllm::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd_cpu", &lightllm::rms_norm_bwd_cpu);
}
