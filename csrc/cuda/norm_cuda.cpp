// CUDA implementations of the lmkern norm ops: the shared checks and allocation
// (prepare_norm_fwd/bwd, csrc/norm_glue.cpp), then the framework-free launchers
// (csrc/cuda/norm_kernels.cu) on the current stream of the input's device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_glue.h"
#include "lmkern/norm_cuda.h"
#include "norm_glue.h"

namespace lmkern {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
    double weight_offset) {
  constexpr const char* op = "layer_norm_fwd";
  check_cuda_tensor(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  NormFwdCall c = prepare_norm_fwd(op, input, weight, bias, residual, eps, weight_offset, false);
  check_cuda(norm_fwd_cuda(c.params, num_sms(), current_stream()), op);
  return {c.out, c.residual_out, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, double eps, double weight_offset) {
  constexpr const char* op = "rms_norm_fwd";
  check_cuda_tensor(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  NormFwdCall c =
      prepare_norm_fwd(op, input, weight, std::nullopt, residual, eps, weight_offset, true);
  check_cuda(norm_fwd_cuda(c.params, num_sms(), current_stream()), op);
  return {c.out, c.residual_out, c.rstd};
}

// Runs the backward kernels of a prepared call, with scratch memory from the caching allocator
// (stream-ordered: freeing it after the launch is safe).
void run_bwd(const char* op, const NormBwdCall& c, const at::Tensor& input) {
  const int sms = num_sms();
  size_t bytes = 0;
  check_cuda(norm_bwd_cuda_workspace_bytes(c.params, sms, &bytes), op);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
  }
  check_cuda(norm_bwd_cuda(c.params, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, sms,
                           current_stream()),
             op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual,
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    double weight_offset) {
  constexpr const char* op = "layer_norm_bwd";
  check_cuda_tensor(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  NormBwdCall c = prepare_norm_bwd(op, grad_out, grad_residual, input, weight, bias, mean, rstd,
                                   weight_offset, false);
  run_bwd(op, c, input);
  return {c.dx, c.dweight, c.dbias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out,
                                                const std::optional<at::Tensor>& grad_residual,
                                                const at::Tensor& input,
                                                const std::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd, double weight_offset) {
  constexpr const char* op = "rms_norm_bwd";
  check_cuda_tensor(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  NormBwdCall c = prepare_norm_bwd(op, grad_out, grad_residual, input, weight, std::nullopt,
                                   std::nullopt, rstd, weight_offset, true);
  run_bwd(op, c, input);
  return {c.dx, c.dweight};
}

}  // namespace
}  // namespace lmkern

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("layer_norm_fwd", &lmkern::layer_norm_fwd);
  m.impl("layer_norm_bwd", &lmkern::layer_norm_bwd);
  m.impl("rms_norm_fwd", &lmkern::rms_norm_fwd);
  m.impl("rms_norm_bwd", &lmkern::rms_norm_bwd);
}
