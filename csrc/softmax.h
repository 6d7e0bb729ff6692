// Softmax shared declarations: the plain argument structs every kernel (CPU and CUDA) reads, and
// the host-side preparation that turns tensors into them (defined in softmax.cpp).
//
// Every kernel sees a row-major problem: `rows` rows of `n` elements, each row contiguous, row r
// of the input starting at r * row_stride (a stride of 0 is fine for reading), outputs contiguous.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LL_HOST_DEVICE __host__ __device__
#else
#define LL_HOST_DEVICE
#endif

namespace lightllm {

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

// Leading dimensions of a broadcast mask after merging, more than enough for attention scores.
constexpr int kMaxMaskDims = 6;

// z = scale * x, then the mask (bool: False -> -inf; additive: + mask), then the causal mask
// (key j > query i -> -inf, top-left aligned as in SDPA), then y = softmax(z) over each row.
struct SoftmaxFwdArgs {
  const void* x;
  void* y;
  int64_t rows;
  int64_t n;
  int64_t x_row_stride;
  float scale;
  int mask_kind;                  // MaskKind; an additive mask has x's dtype, a bool mask 1 byte
  const void* mask;
  int64_t mask_col_stride;        // 0 (one value per row) or 1
  int mask_ndim;                  // leading dims of the mask, merged; row -> offset by div/mod
  int64_t mask_sizes[kMaxMaskDims];
  int64_t mask_strides[kMaxMaskDims];
  int causal;
  int64_t nq;                     // query length (x.size(-2)): query index = row % nq
  int zero_masked_rows;           // rows whose z are all -inf give 0 (scaled_masked_softmax)
                                  // rather than NaN (torch.softmax)
};

// dx = scale * y * (dy - sum(dy * y)) over each row.
struct SoftmaxBwdArgs {
  const void* dy;
  const void* y;
  void* dx;
  int64_t rows;
  int64_t n;
  int64_t dy_row_stride;
  int64_t y_row_stride;
  float scale;
};

// Offset of a row's mask values: the row index is split into the mask's (merged) leading indices.
LL_HOST_DEVICE inline int64_t mask_row_offset(const SoftmaxFwdArgs& a, int64_t row) {
  int64_t offset = 0;
  for (int d = a.mask_ndim - 1; d >= 0; --d) {
    offset += (row % a.mask_sizes[d]) * a.mask_strides[d];
    row /= a.mask_sizes[d];
  }
  return offset;
}

}  // namespace lightllm

#if !defined(LIGHTLLM_NO_TORCH)
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>

namespace lightllm {

// Checked inputs and their kernel arguments; the tensors keep alive any copies made on the way.
struct SoftmaxFwdPlan {
  at::Tensor x, mask, y;
  SoftmaxFwdArgs args;
};
struct SoftmaxBwdPlan {
  at::Tensor dy, y, dx;
  SoftmaxBwdArgs args;
};

// Validate (TORCH_CHECK, naming `op` and the argument), view or copy into row form, allocate.
SoftmaxFwdPlan plan_softmax_fwd(const char* op, const at::Tensor& x,
                                const std::optional<at::Tensor>& mask, double scale,
                                bool is_causal, bool zero_masked_rows);
SoftmaxBwdPlan plan_softmax_bwd(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                double scale);

// Call f(T{}) with the element type of a kernel dtype (float, c10::Half or c10::BFloat16).
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "lightllm softmax: unsupported dtype ", t);
  }
}

}  // namespace lightllm
#endif
