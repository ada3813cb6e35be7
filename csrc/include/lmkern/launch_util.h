// Host-side helpers shared by the framework-free CUDA launchers (csrc/cuda/*_kernels.cu): size
// arithmetic, alignment, early return on CUDA errors, and the dispatch from the runtime DType to
// the element type a kernel template takes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "lmkern/norm.h"  // DType

// Returns the cudaError_t of `expr` from the enclosing function unless it is cudaSuccess.
#define LMKERN_TRY(expr)                  \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

namespace lmkern {
namespace launch {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t round_up(size_t a, size_t b) { return (a + b - 1) / b * b; }
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline size_t dtype_size(DType t) { return t == DType::Float32 ? 4 : 2; }

// A type carried as a value, so that a generic lambda can receive the element type.
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the element type T of `t`.
template <typename F>
cudaError_t dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::Float32: return f(Tag<float>{});
    case DType::Float16: return f(Tag<__half>{});
    case DType::BFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace launch
}  // namespace lmkern
