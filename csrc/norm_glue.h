// Torch-side checks and output allocation shared by the CPU and CUDA implementations of the
// norm ops: each device file only runs its kernel on the prepared NormFwdParams/NormBwdParams.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "lmkern/norm.h"

namespace lmkern {

// A checked forward call: params points into the tensors held here.
struct NormFwdCall {
  NormFwdParams params;
  at::Tensor x, weight, bias, residual;  // inputs as the kernel reads them (maybe made contiguous)
  at::Tensor out, residual_out, mean, rstd;
};

struct NormBwdCall {
  NormBwdParams params;
  at::Tensor dy, dresidual, x, weight, mean, rstd;
  at::Tensor dx, dweight, dbias;
};

NormFwdCall prepare_norm_fwd(const char* op, const at::Tensor& input,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, double eps,
                             double weight_offset, bool is_rms);

NormBwdCall prepare_norm_bwd(const char* op, const at::Tensor& grad_out,
                             const std::optional<at::Tensor>& grad_residual,
                             const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                             double weight_offset, bool is_rms);

}  // namespace lmkern
