// Small helpers shared by the torch glue of every op family (norm_glue.cpp, sampling_glue.cpp).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "lmkern/norm.h"  // DType

namespace lmkern {

// The kernels' dtype tag of a tensor dtype; TypeError naming `arg` for anything else.
inline DType kernel_dtype(const char* op, const char* arg, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "lmkern.", op, ": ", arg,
                       " must be float32, float16 or bfloat16 for this backend, got ", t);
  }
}

// The kernels read 2-D tensors row by row with unit element stride and any row stride.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace lmkern
