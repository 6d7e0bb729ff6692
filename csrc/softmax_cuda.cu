// CUDA softmax for lightllm._C: binds the kernels of softmax_kernels.cuh to the ops that
// softmax.cpp defines, on the current stream of the input's device. Inputs are checked (and put
// in row form) by the same code as on the CPU.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "softmax.h"
#include "softmax_kernels.cuh"

namespace lightllm {
namespace {

// Dynamic shared memory a block may use on `device`, less room for the kernels' static arrays.
int64_t smem_budget(c10::DeviceIndex device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return optin - 1024;
}

at::Tensor workspace(int64_t floats, const at::Tensor& like) {
  return floats > 0 ? at::empty({floats}, like.options().dtype(at::kFloat)) : at::Tensor();
}

float* data_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<float*>(t.data_ptr()) : nullptr;
}

at::Tensor run_fwd_cuda(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                        double scale, bool is_causal, bool zero_masked_rows) {
  const c10::cuda::CUDAGuard guard(x.device());
  SoftmaxFwdPlan p = plan_softmax_fwd(op, x, mask, scale, is_causal, zero_masked_rows);
  if (p.args.rows == 0 || p.args.n == 0) return p.y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t smem = smem_budget(x.device().index());
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const cuda::Plan plan = cuda::plan_fwd<T>(p.args, smem);
    const at::Tensor ws = workspace(plan.workspace, x);
    cuda::launch_fwd<T>(p.args, plan, data_or_null(ws), stream);
  });
  return p.y;
}

at::Tensor run_bwd_cuda(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                        double scale) {
  const c10::cuda::CUDAGuard guard(y.device());
  SoftmaxBwdPlan p = plan_softmax_bwd(op, grad_y, y, scale);
  if (p.args.rows == 0 || p.args.n == 0) return p.dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t smem = smem_budget(y.device().index());
  dispatch_dtype(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const cuda::Plan plan = cuda::plan_bwd<T>(p.args, smem);
    const at::Tensor ws = workspace(plan.workspace, y);
    cuda::launch_bwd<T>(p.args, plan, data_or_null(ws), stream);
  });
  return p.dx;
}

at::Tensor softmax_fwd_cuda(const at::Tensor& x) {
  return run_fwd_cuda("lightllm::softmax_fwd", x, std::nullopt, 1.0, false, false);
}

at::Tensor softmax_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y) {
  return run_bwd_cuda("lightllm::softmax_bwd", grad_y, y, 1.0);
}

at::Tensor scaled_masked_softmax_fwd_cuda(const at::Tensor& x,
                                          const std::optional<at::Tensor>& mask, double scale,
                                          bool is_causal) {
  return run_fwd_cuda("lightllm::scaled_masked_softmax_fwd", x, mask, scale, is_causal, true);
}

at::Tensor scaled_masked_softmax_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y,
                                          double scale) {
  return run_bwd_cuda("lightllm::scaled_masked_softmax_bwd", grad_y, y, scale);
}

}  // namespace
}  // namespace lightllm

TORCH_LIBRARY_IMPL(lightllm, CUDA, m) {
  m.impl("softmax_fwd", &lightllm::softmax_fwd_cuda);
  m.impl("softmax_bwd", &lightllm::softmax_bwd_cuda);
  m.impl("scaled_masked_softmax_fwd", &lightllm::scaled_masked_softmax_fwd_cuda);
  m.impl("scaled_masked_softmax_bwd", &lightllm::scaled_masked_softmax_bwd_cuda);
}
