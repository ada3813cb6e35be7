// Framework-free description of the LayerNorm/RMSNorm kernels: plain pointers, sizes and strides.
// Shared by the CUDA kernels (csrc/include/lmkern/norm.cuh, csrc/cuda/norm_kernels.cu), the CPU
// kernels (csrc/cpu/norm_cpu.cpp) and the torch glue (csrc/norm_glue.h). No torch include here.
#pragma once
#include <cstdint>

namespace lmkern {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// y = norm(h) * (weight + weight_offset) + bias, per row of an (M, N) matrix, where
// h = x, or h = round_to_x_dtype(x + residual) when a residual is fused (then stored in
// residual_out). LayerNorm: norm(h) = (h - mean) * rstd, rstd = 1/sqrt(var + eps), biased var.
// RMSNorm: norm(h) = h * rstd, rstd = 1/sqrt(mean(h^2) + eps). Statistics in fp32.
struct NormFwdParams {
  const void* x = nullptr;          // (M, N), element stride 1, rows x_row_stride apart
  int64_t x_row_stride = 0;
  const void* residual = nullptr;   // optional (M, N), same dtype as x
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;     // optional (N,), contiguous, dtype w_dtype
  const void* bias = nullptr;       // optional (N,), contiguous, dtype w_dtype (LayerNorm only)
  void* out = nullptr;              // (M, N) contiguous, dtype x_dtype
  void* residual_out = nullptr;     // (M, N) contiguous, dtype x_dtype; set iff residual is
  float* mean = nullptr;            // (M,) LayerNorm only
  float* rstd = nullptr;            // (M,)
  int64_t M = 0, N = 0;
  float eps = 1e-5f;
  float weight_offset = 0.f;
  bool is_rms = false;
  DType x_dtype = DType::Float32;
  DType w_dtype = DType::Float32;   // dtype of weight and bias (equal when both are given)
};

// Gradients of the forward above with respect to h (plus grad_residual, the gradient arriving at
// residual_out, which flows to both x and residual), weight and bias:
//   xhat = norm(h), g = dy * (weight + weight_offset)
//   LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
//   dweight = sum over rows of dy * xhat, dbias = sum over rows of dy (accumulated in fp32)
struct NormBwdParams {
  const void* dy = nullptr;         // (M, N), element stride 1
  int64_t dy_row_stride = 0;
  const void* dresidual = nullptr;  // optional (M, N), element stride 1, dtype x_dtype
  int64_t dresidual_row_stride = 0;
  const void* x = nullptr;          // the normalized input h, (M, N), element stride 1
  int64_t x_row_stride = 0;
  const void* weight = nullptr;     // optional (N,) contiguous
  const float* mean = nullptr;      // (M,) LayerNorm only
  const float* rstd = nullptr;      // (M,)
  void* dx = nullptr;               // (M, N) contiguous, dtype x_dtype
  void* dweight = nullptr;          // optional (N,) contiguous, dtype w_dtype
  void* dbias = nullptr;            // optional (N,) contiguous, dtype w_dtype
  int64_t M = 0, N = 0;
  float weight_offset = 0.f;
  bool is_rms = false;
  DType x_dtype = DType::Float32;
  DType w_dtype = DType::Float32;
};

}  // namespace lmkern
