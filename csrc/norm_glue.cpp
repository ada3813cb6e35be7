#include "norm_glue.h"

#include "glue_common.h"

#include <c10/util/Exception.h>

namespace lmkern {
namespace {

void check_matrix(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2, "lmkern.", op, ": ", arg, " must be 2-D (rows, hidden), got shape ",
              t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes(), "lmkern.", op, ": ", arg, " must have shape ",
              like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "lmkern.", op, ": ", arg, " is on ", t.device(),
              " but input is on ", like.device());
}

void check_vector(const char* op, const char* arg, const at::Tensor& t, int64_t n,
                  const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "lmkern.", op, ": ", arg, " must have shape (", n,
              ",), got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), "lmkern.", op, ": ", arg, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat,
                   "lmkern.", op, ": ", arg, " must be ", input.scalar_type(),
                   " (like input) or float32, got ", t.scalar_type());
}

// weight and bias share one dtype inside the kernels.
at::ScalarType affine_dtype(const char* op, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias) {
  if (weight && bias) {
    TORCH_CHECK_TYPE(weight->scalar_type() == bias->scalar_type(), "lmkern.", op,
                     ": weight and bias must have the same dtype, got ", weight->scalar_type(),
                     " and ", bias->scalar_type());
  }
  if (weight) return weight->scalar_type();
  if (bias) return bias->scalar_type();
  return input.scalar_type();
}

}  // namespace

NormFwdCall prepare_norm_fwd(const char* op, const at::Tensor& input,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, double eps,
                             double weight_offset, bool is_rms) {
  TORCH_CHECK(input.dim() == 2, "lmkern.", op, ": input must be 2-D (rows, hidden), got shape ",
              input.sizes());
  const int64_t M = input.size(0), N = input.size(1);
  NormFwdCall c;
  NormFwdParams& p = c.params;
  p.x_dtype = kernel_dtype(op, "input", input.scalar_type());
  p.w_dtype = kernel_dtype(op, "weight", affine_dtype(op, input, weight, bias));
  c.x = rows_unit_stride(input);
  if (weight) {
    check_vector(op, "weight", *weight, N, input);
    c.weight = weight->contiguous();
    p.weight = c.weight.data_ptr();
  }
  if (bias) {
    check_vector(op, "bias", *bias, N, input);
    c.bias = bias->contiguous();
    p.bias = c.bias.data_ptr();
  }
  auto stats = input.options().dtype(at::kFloat);
  c.out = at::empty({M, N}, input.options());
  c.rstd = at::empty({M}, stats);
  c.mean = is_rms ? at::Tensor() : at::empty({M}, stats);
  if (residual) {
    check_matrix(op, "residual", *residual, input);
    TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type(), "lmkern.", op,
                     ": residual must have input's dtype ", input.scalar_type(), ", got ",
                     residual->scalar_type());
    c.residual = rows_unit_stride(*residual);
    c.residual_out = at::empty({M, N}, input.options());
    p.residual = c.residual.data_ptr();
    p.residual_row_stride = c.residual.stride(0);
    p.residual_out = c.residual_out.data_ptr();
  } else {
    c.residual_out = at::empty({0}, input.options());
  }
  p.x = c.x.data_ptr();
  p.x_row_stride = c.x.stride(0);
  p.out = c.out.data_ptr();
  p.rstd = c.rstd.data_ptr<float>();
  p.mean = is_rms ? nullptr : c.mean.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.eps = static_cast<float>(eps);
  p.weight_offset = static_cast<float>(weight_offset);
  p.is_rms = is_rms;
  return c;
}

NormBwdCall prepare_norm_bwd(const char* op, const at::Tensor& grad_out,
                             const std::optional<at::Tensor>& grad_residual,
                             const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                             double weight_offset, bool is_rms) {
  TORCH_CHECK(input.dim() == 2, "lmkern.", op, ": input must be 2-D (rows, hidden), got shape ",
              input.sizes());
  const int64_t M = input.size(0), N = input.size(1);
  NormBwdCall c;
  NormBwdParams& p = c.params;
  p.x_dtype = kernel_dtype(op, "input", input.scalar_type());
  p.w_dtype = kernel_dtype(op, "weight", affine_dtype(op, input, weight, bias));
  check_matrix(op, "grad_out", grad_out, input);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == input.scalar_type(), "lmkern.", op,
                   ": grad_out must have input's dtype ", input.scalar_type(), ", got ",
                   grad_out.scalar_type());
  c.x = rows_unit_stride(input);
  c.dy = rows_unit_stride(grad_out);
  auto check_stats = [&](const char* arg, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == M && t.scalar_type() == at::kFloat &&
                    t.device() == input.device(),
                "lmkern.", op, ": ", arg, " must be a float32 tensor of shape (", M, ",) on ",
                input.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  check_stats("rstd", rstd);
  c.rstd = rstd.contiguous();
  if (!is_rms) {
    TORCH_CHECK(mean.has_value(), "lmkern.", op, ": mean is required for layer_norm backward");
    check_stats("mean", *mean);
    c.mean = mean->contiguous();
    p.mean = c.mean.data_ptr<float>();
  }
  if (grad_residual) {
    check_matrix(op, "grad_residual", *grad_residual, input);
    TORCH_CHECK_TYPE(grad_residual->scalar_type() == input.scalar_type(), "lmkern.", op,
                     ": grad_residual must have input's dtype ", input.scalar_type(), ", got ",
                     grad_residual->scalar_type());
    c.dresidual = rows_unit_stride(*grad_residual);
    p.dresidual = c.dresidual.data_ptr();
    p.dresidual_row_stride = c.dresidual.stride(0);
  }
  c.dx = at::empty({M, N}, input.options());
  if (weight) {
    check_vector(op, "weight", *weight, N, input);
    c.weight = weight->contiguous();
    p.weight = c.weight.data_ptr();
    c.dweight = at::empty({N}, weight->options());
    p.dweight = c.dweight.data_ptr();
  } else {
    c.dweight = at::empty({0}, input.options());
  }
  if (bias) {
    check_vector(op, "bias", *bias, N, input);
    c.dbias = at::empty({N}, bias->options());
    p.dbias = c.dbias.data_ptr();
  } else {
    c.dbias = at::empty({0}, input.options());
  }
  p.dy = c.dy.data_ptr();
  p.dy_row_stride = c.dy.stride(0);
  p.x = c.x.data_ptr();
  p.x_row_stride = c.x.stride(0);
  p.rstd = c.rstd.data_ptr<float>();
  p.dx = c.dx.data_ptr();
  p.M = M;
  p.N = N;
  p.weight_offset = static_cast<float>(weight_offset);
  p.is_rms = is_rms;
  return c;
}

}  // namespace lmkern
