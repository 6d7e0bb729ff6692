// Softmax for lightllm._C: the TORCH_LIBRARY schemas, input checks and the CPU kernels.
//
// Ops (namespace lightllm; fake tensors and autograd are registered from Python, in
// lightllm/ops/softmax.py):
//   softmax_fwd(Tensor x) -> Tensor                          softmax over the last dim
//   softmax_bwd(Tensor grad_y, Tensor y) -> Tensor           y * (grad_y - sum(grad_y * y))
//   scaled_masked_softmax_fwd(Tensor x, Tensor? mask, float scale, bool is_causal) -> Tensor
//   scaled_masked_softmax_bwd(Tensor grad_y, Tensor y, float scale) -> Tensor
// Outputs are always fresh contiguous tensors of the input's shape.
//
// CPU algorithm, per row (rows in parallel with at::parallel_for): z = scale * x with the mask
// applied, written to an fp32 scratch row (cache-resident for all but huge rows); the max;
// e = exp(z - max) and its sum in one pass; y = e / sum. The reductions and the exponential run
// on explicit 4-float vectors. Traffic: one read of x (and the mask), one write of y. Backward:
// one pass for sum(dy * y), one for dx.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "softmax.h"

namespace lightllm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Outputs start as NaN when LIGHTLLM_POISON_OUTPUTS=1 (the tests set it), so an element a kernel
// forgets to write fails the parity check instead of passing on leftover memory.
bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("LIGHTLLM_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out =
      at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs() && out.numel() > 0) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

// `t` as rows of its last dim, contiguous within a row and one stride between rows: a view where
// the layout allows (any slice or permutation whose leading dims merge), else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t* row_stride) {
  const int64_t n = t.size(-1);
  bool viewable = n <= 1 || t.stride(-1) == 1;
  bool found = false;
  int64_t stride = n, expected = 0;
  for (int64_t d = t.dim() - 2; d >= 0 && viewable; --d) {
    if (t.size(d) == 1) continue;
    if (!found) {
      stride = t.stride(d);
      expected = stride * t.size(d);
      found = true;
    } else {
      viewable = t.stride(d) == expected;
      expected *= t.size(d);
    }
  }
  if (viewable) {
    *row_stride = stride;
    return t;
  }
  *row_stride = n;
  return t.contiguous();
}

bool broadcastable(at::IntArrayRef from, at::IntArrayRef to) {
  if (from.size() > to.size()) return false;
  const size_t off = to.size() - from.size();
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i] != 1 && from[i] != to[off + i]) return false;
  }
  return true;
}

// Fill the mask fields of `a` from `mask` (already checked), expanded to x's shape without a copy
// where the merged leading dims fit kMaxMaskDims and the key dim has stride 0 or 1.
at::Tensor describe_mask(const at::Tensor& mask, const at::Tensor& x, SoftmaxFwdArgs& a) {
  at::Tensor m = mask.expand(x.sizes());
  const int64_t n = x.size(-1);
  if (n > 1 && m.stride(-1) > 1) m = mask.contiguous().expand(x.sizes());
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::vector<int64_t> sizes, strides;
    for (int64_t d = 0; d + 1 < m.dim(); ++d) {
      if (m.size(d) == 1) continue;
      if (!sizes.empty() && strides.back() == m.stride(d) * m.size(d)) {  // merge into outer dim
        sizes.back() *= m.size(d);
        strides.back() = m.stride(d);
      } else {
        sizes.push_back(m.size(d));
        strides.push_back(m.stride(d));
      }
    }
    if (sizes.size() <= static_cast<size_t>(kMaxMaskDims)) {
      a.mask_ndim = static_cast<int>(sizes.size());
      std::copy(sizes.begin(), sizes.end(), a.mask_sizes);
      std::copy(strides.begin(), strides.end(), a.mask_strides);
      break;
    }
    m = m.contiguous();  // too many broadcast dims to index: materialise (rare)
  }
  a.mask_col_stride = (n > 1 && m.stride(-1) == 1) ? 1 : 0;
  a.mask = m.data_ptr();
  a.mask_kind = m.scalar_type() == at::kBool ? kBoolMask : kAdditiveMask;
  return m;
}

}  // namespace

SoftmaxFwdPlan plan_softmax_fwd(const char* op, const at::Tensor& x,
                                const std::optional<at::Tensor>& mask, double scale,
                                bool is_causal, bool zero_masked_rows) {
  TORCH_CHECK(x.layout() == at::kStrided, op, ": x must be a strided (dense) tensor");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op,
              ": x must have dtype float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-dim tensor");
  TORCH_CHECK(!is_causal || x.dim() >= 2, op,
              ": is_causal=True needs x with at least 2 dimensions (..., queries, keys), got "
              "shape ",
              x.sizes());
  SoftmaxFwdPlan p;
  SoftmaxFwdArgs& a = p.args;
  std::memset(&a, 0, sizeof(a));
  a.n = x.size(-1);
  a.rows = a.n > 0 ? x.numel() / a.n : 0;
  p.x = as_rows(x, &a.x_row_stride);
  p.y = empty_output(x);
  a.x = p.x.data_ptr();
  a.y = p.y.data_ptr();
  a.scale = static_cast<float>(scale);
  a.causal = is_causal ? 1 : 0;
  a.nq = is_causal ? x.size(-2) : 1;
  a.zero_masked_rows = zero_masked_rows ? 1 : 0;
  a.mask_kind = kNoMask;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.layout() == at::kStrided, op, ": mask must be a strided (dense) tensor");
    TORCH_CHECK(m.device() == x.device(), op, ": mask must be on x's device (", x.device(),
                "), got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(), op,
                ": mask must be bool (True = keep) or additive with x's dtype (", x.scalar_type(),
                "), got ", m.scalar_type());
    TORCH_CHECK(broadcastable(m.sizes(), x.sizes()), op, ": mask of shape ", m.sizes(),
                " is not broadcastable to x of shape ", x.sizes());
    if (a.rows > 0 && a.n > 0) p.mask = describe_mask(m, x, a);
  }
  return p;
}

SoftmaxBwdPlan plan_softmax_bwd(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                double scale) {
  TORCH_CHECK(y.layout() == at::kStrided && grad_y.layout() == at::kStrided, op,
              ": grad_y and y must be strided (dense) tensors");
  TORCH_CHECK(is_kernel_dtype(y.scalar_type()), op,
              ": y must have dtype float32, float16 or bfloat16, got ", y.scalar_type());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), op, ": grad_y must have y's dtype (",
              y.scalar_type(), "), got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == y.device(), op, ": grad_y must be on y's device (", y.device(),
              "), got ", grad_y.device());
  TORCH_CHECK(grad_y.sizes() == y.sizes(), op, ": grad_y must have y's shape ", y.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(y.dim() >= 1, op, ": y must have at least 1 dimension, got a 0-dim tensor");
  SoftmaxBwdPlan p;
  SoftmaxBwdArgs& a = p.args;
  std::memset(&a, 0, sizeof(a));
  a.n = y.size(-1);
  a.rows = a.n > 0 ? y.numel() / a.n : 0;
  p.dy = as_rows(grad_y, &a.dy_row_stride);
  p.y = as_rows(y, &a.y_row_stride);
  p.dx = empty_output(y);
  a.dy = p.dy.data_ptr();
  a.y = p.y.data_ptr();
  a.dx = p.dx.data_ptr();
  a.scale = static_cast<float>(scale);
  return p;
}

namespace {

// ------------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------------

// Sixteen floats as one GCC/Clang vector: SIMD whatever the auto-vectoriser decides, with no
// -ffast-math (NaN and inf keep their meaning). The hot loops are compiled for AVX-512, AVX2 and
// the baseline (target_clones, picked once at load time), where the type is 1, 2 or 4 registers.
// Every helper taking or returning one is always inlined, so the psABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
using F16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));
using U16 = uint32_t __attribute__((vector_size(64)));
constexpr int kBlock = 16;

#define LIGHTLLM_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// Vector helpers must be inlined into each clone: a call across targets passes F16 differently.
#define LIGHTLLM_VEC_INLINE __attribute__((always_inline)) inline

LIGHTLLM_VEC_INLINE F16 load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LIGHTLLM_VEC_INLINE void store16(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }

LIGHTLLM_VEC_INLINE F16 splat(float s) { return F16{} + s; }

// m ? a : b lane-wise (m is all ones or all zeros per lane), with bit operations.
LIGHTLLM_VEC_INLINE F16 select(I16 m, F16 a, F16 b) {
  const U16 mu = (U16)m;  // NOLINT(readability/casting): vector casts reinterpret the bits
  return (F16)((mu & (U16)a) | (~mu & (U16)b));  // NOLINT(readability/casting)
}

LIGHTLLM_VEC_INLINE float lane_sum(F16 v) {
  float s = 0.0f;
  for (int l = 0; l < kBlock; ++l) s += v[l];
  return s;
}

// e^x for x <= 0, -inf and NaN (all softmax needs once the max is subtracted): Cephes'
// single-precision polynomial (about 1 ulp), the power of two built from the integer bits of the
// rounding. Results below the smallest normal float (e^-87.3) give 0.
LIGHTLLM_VEC_INLINE F16 exp_nonpositive(F16 x) {
  const F16 lowest = splat(-87.33654f);   // ln(FLT_MIN)
  const F16 round = splat(12582912.0f);   // 1.5 * 2^23: adding it rounds to an integer
  const I16 tiny = x < lowest;
  const F16 xc = select(tiny, lowest, x);  // NaN stays NaN
  const F16 t = xc * 1.44269504088896341f + round;
  const F16 k = t - round;                // round(x / ln 2), in [-126, 0]
  const F16 r = xc - k * 0.693359375f - k * -2.12194440e-4f;
  F16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F16 er = p * r * r + r + 1.0f;
  const U16 pow2 = ((U16)t - (0x4B400000u - 127u)) << 23;  // NOLINT(readability/casting)
  return select(tiny, splat(0.0f), er * (F16)pow2);          // NOLINT(readability/casting)
}

// Row scratch: fp32, its length rounded up to kBlock and the padding set to -inf (which adds
// nothing to a max or a sum of exponentials), so the reductions run whole vectors only.
int64_t padded(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

LIGHTLLM_CPU_CLONES float row_max(const float* z, int64_t n_padded) {
  F16 acc = splat(-kInf);
  for (int64_t j = 0; j < n_padded; j += kBlock) {
    const F16 v = load16(z + j);
    acc = select(v > acc, v, acc);  // NaNs are skipped here; the sum of exponentials carries them
  }
  float m = -kInf;
  for (int l = 0; l < kBlock; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// z <- exp(z - shift), returning the sum.
LIGHTLLM_CPU_CLONES float exp_and_sum(float* z, int64_t n_padded, float shift) {
  F16 acc = {};
  for (int64_t j = 0; j < n_padded; j += kBlock) {
    const F16 e = exp_nonpositive(load16(z + j) - shift);
    store16(z + j, e);
    acc += e;
  }
  return lane_sum(acc);
}

LIGHTLLM_CPU_CLONES void scale_row(float* z, const float* x, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) z[j] = x[j] * scale;
}

LIGHTLLM_CPU_CLONES void normalise_row(float* y, const float* z, int64_t n, float inv) {
  for (int64_t j = 0; j < n; ++j) y[j] = z[j] * inv;
}

// dx = scale * y * (dy - sum(dy * y)) for one row.
LIGHTLLM_CPU_CLONES void softmax_bwd_row(float* dx, const float* dy, const float* y, int64_t n,
                                         float scale) {
  F16 acc = {};
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) acc += load16(dy + j) * load16(y + j);
  float dot = lane_sum(acc);
  for (; j < n; ++j) dot += dy[j] * y[j];
  for (j = 0; j < n; ++j) dx[j] = scale * (y[j] * (dy[j] - dot));
}

// fp16/bf16 rows are converted to fp32 a block of rows at a time by ATen's vectorised copy, so
// the arithmetic below only ever sees fp32; a block stays in the cache between the conversions.
constexpr int64_t kBlockElems = 1 << 16;

int64_t rows_per_block(int64_t n) { return std::max<int64_t>(1, kBlockElems / n); }

// Rows [begin, end) of a (rows, n) matrix with row stride `stride`, as a tensor over raw memory.
at::Tensor row_block(const void* p, at::ScalarType t, int64_t begin, int64_t end, int64_t n,
                     int64_t stride) {
  const int64_t offset = begin * stride * static_cast<int64_t>(c10::elementSize(t));
  return at::from_blob(const_cast<char*>(static_cast<const char*>(p)) + offset, {end - begin, n},
                       {stride, 1}, at::TensorOptions().dtype(t));
}

// Source rows as fp32: the memory itself for fp32, else converted into `buf`.
const float* rows_as_float(const void* p, at::ScalarType t, int64_t begin, int64_t end, int64_t n,
                           int64_t* stride, std::vector<float>& buf) {
  if (t == at::kFloat) return static_cast<const float*>(p) + begin * *stride;
  buf.resize((end - begin) * n);
  row_block(buf.data(), at::kFloat, 0, end - begin, n, n)
      .copy_(row_block(p, t, begin, end, n, *stride));
  *stride = n;
  return buf.data();
}

// One row: z = scale * x (+ masks) into the padded scratch, max, exp and sum, y = e / sum.
template <typename T>
void softmax_fwd_row(const SoftmaxFwdArgs& a, int64_t r, const float* x, float* y, float* z) {
  const int64_t n = a.n, np = padded(n);
  // Phase 1: z = scale * x with the mask and the causal mask applied.
  scale_row(z, x, n, a.scale);
  if (a.mask_kind == kBoolMask) {
    const uint8_t* m = static_cast<const uint8_t*>(a.mask) + mask_row_offset(a, r);
    for (int64_t j = 0; j < n; ++j) z[j] = m[j * a.mask_col_stride] ? z[j] : -kInf;
  } else if (a.mask_kind == kAdditiveMask) {
    const T* m = static_cast<const T*>(a.mask) + mask_row_offset(a, r);
    for (int64_t j = 0; j < n; ++j) z[j] += static_cast<float>(m[j * a.mask_col_stride]);
  }
  if (a.causal) {
    for (int64_t j = r % a.nq + 1; j < n; ++j) z[j] = -kInf;
  }
  // Phase 2: the max; a row that is entirely -inf shifts by 0 when it must give zeros.
  const float mx = row_max(z, np);
  const float shift = (a.zero_masked_rows && mx == -kInf) ? 0.0f : mx;
  // Phase 3: exponentials and their sum (0 only for a fully masked row).
  const float sum = exp_and_sum(z, np, shift);
  const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
  // Phase 4: normalise and store; restore the padding for the next row.
  normalise_row(y, z, n, inv);
  std::fill(z + n, z + np, -kInf);
}

template <typename T>
void softmax_fwd_cpu_kernel(const SoftmaxFwdArgs& a, at::ScalarType t) {
  const int64_t n = a.n, block = rows_per_block(n);
  at::parallel_for(0, a.rows, block, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(padded(n), -kInf), xbuf, ybuf;
    for (int64_t b = begin; b < end; b += block) {
      const int64_t e = std::min(end, b + block);
      int64_t x_stride = a.x_row_stride;
      const float* x = rows_as_float(a.x, t, b, e, n, &x_stride, xbuf);
      if (t != at::kFloat) ybuf.resize((e - b) * n);
      float* y = t == at::kFloat ? static_cast<float*>(a.y) + b * n : ybuf.data();
      for (int64_t r = b; r < e; ++r) {
        softmax_fwd_row<T>(a, r, x + (r - b) * x_stride, y + (r - b) * n, scratch.data());
      }
      if (t != at::kFloat) {
        row_block(a.y, t, b, e, n, n).copy_(row_block(y, at::kFloat, 0, e - b, n, n));
      }
    }
  });
}

void softmax_bwd_cpu_kernel(const SoftmaxBwdArgs& a, at::ScalarType t) {
  const int64_t n = a.n, block = rows_per_block(n);
  at::parallel_for(0, a.rows, block, [&](int64_t begin, int64_t end) {
    std::vector<float> dybuf, ybuf, dxbuf;
    for (int64_t b = begin; b < end; b += block) {
      const int64_t e = std::min(end, b + block);
      int64_t dy_stride = a.dy_row_stride, y_stride = a.y_row_stride;
      const float* dy = rows_as_float(a.dy, t, b, e, n, &dy_stride, dybuf);
      const float* y = rows_as_float(a.y, t, b, e, n, &y_stride, ybuf);
      if (t != at::kFloat) dxbuf.resize((e - b) * n);
      float* dx = t == at::kFloat ? static_cast<float*>(a.dx) + b * n : dxbuf.data();
      for (int64_t i = 0; i < e - b; ++i) {
        softmax_bwd_row(dx + i * n, dy + i * dy_stride, y + i * y_stride, n, a.scale);
      }
      if (t != at::kFloat) {
        row_block(a.dx, t, b, e, n, n).copy_(row_block(dx, at::kFloat, 0, e - b, n, n));
      }
    }
  });
}

at::Tensor run_fwd_cpu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                       double scale, bool is_causal, bool zero_masked_rows) {
  SoftmaxFwdPlan p = plan_softmax_fwd(op, x, mask, scale, is_causal, zero_masked_rows);
  if (p.args.rows > 0 && p.args.n > 0) {
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      softmax_fwd_cpu_kernel<decltype(tag)>(p.args, x.scalar_type());
    });
  }
  return p.y;
}

at::Tensor run_bwd_cpu(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                       double scale) {
  SoftmaxBwdPlan p = plan_softmax_bwd(op, grad_y, y, scale);
  if (p.args.rows > 0 && p.args.n > 0) {
    softmax_bwd_cpu_kernel(p.args, y.scalar_type());
  }
  return p.dx;
}

at::Tensor softmax_fwd_cpu(const at::Tensor& x) {
  return run_fwd_cpu("lightllm::softmax_fwd", x, std::nullopt, 1.0, false, false);
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  return run_bwd_cpu("lightllm::softmax_bwd", grad_y, y, 1.0);
}

at::Tensor scaled_masked_softmax_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                         double scale, bool is_causal) {
  return run_fwd_cpu("lightllm::scaled_masked_softmax_fwd", x, mask, scale, is_causal, true);
}

at::Tensor scaled_masked_softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y,
                                         double scale) {
  return run_bwd_cpu("lightllm::scaled_masked_softmax_bwd", grad_y, y, scale);
}

}  // namespace
}  // namespace lightllm

// The namespace is shared with the Python ops (torch.library.custom_op("lightllm::...")), which
// add to it as fragments; this is its one defining block.
TORCH_LIBRARY(lightllm, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("softmax_fwd(Tensor x) -> Tensor", tags);
  m.def("softmax_bwd(Tensor grad_y, Tensor y) -> Tensor", tags);
  m.def("scaled_masked_softmax_fwd(Tensor x, Tensor? mask, float scale, bool is_causal) -> Tensor",
        tags);
  m.def("scaled_masked_softmax_bwd(Tensor grad_y, Tensor y, float scale) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(lightllm, CPU, m) {
  m.impl("softmax_fwd", &lightllm::softmax_fwd_cpu);
  m.impl("softmax_bwd", &lightllm::softmax_bwd_cpu);
  m.impl("scaled_masked_softmax_fwd", &lightllm::scaled_masked_softmax_fwd_cpu);
  m.impl("scaled_masked_softmax_bwd", &lightllm::scaled_masked_softmax_bwd_cpu);
}

// lightllm._C is imported as a Python module only to run the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_C",
                               "lightllm's C++/CUDA softmax ops (torch.ops.lightllm.*)",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
