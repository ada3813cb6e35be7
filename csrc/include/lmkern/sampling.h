// Framework-free description of the sampling kernels: plain pointers, sizes and strides. Shared by
// the CPU kernels (csrc/cpu/sampling_cpu.cpp), the CUDA kernels (csrc/include/lmkern/sampling.cuh,
// csrc/cuda/sampling_kernels.cu) and the torch glue (csrc/sampling_glue.h). No torch include here.
// The math is specified in lmkern/reference/sampling.py; the random words in lmkern/philox.h.
#pragma once
#include <cstdint>

#include "lmkern/norm.h"  // DType

namespace lmkern {

// One token per row of (B, V) logits: ids[r] and, if logprobs is set, logprobs[r].
// Per-row parameters: the pointer's value when set ((B,) contiguous on the logits' device),
// else the scalar. Disabled filters: top_k <= 0 or >= V, top_p >= 1, min_p <= 0. temperature 0
// is greedy argmax. Invalid rows (a NaN or +inf logit, or no finite logit) get id -1, logprob NaN.
struct SampleParams {
  const void* logits = nullptr;  // (B, V), element stride 1, rows logits_row_stride apart
  int64_t logits_row_stride = 0;
  DType dtype = DType::Float32;
  int64_t B = 0, V = 0;
  float temperature = 1.f;
  int64_t top_k = 0;
  float top_p = 1.f;
  float min_p = 0.f;
  const float* temperatures = nullptr;  // optional (B,)
  const int64_t* top_ks = nullptr;      // optional (B,)
  const float* top_ps = nullptr;        // optional (B,)
  const float* min_ps = nullptr;        // optional (B,)
  uint64_t seed = 0;                    // scalar seed: Philox key, stream = row index
  const int64_t* seeds = nullptr;       // optional (B,): per-row Philox keys, stream 0
  int64_t* ids = nullptr;               // (B,)
  float* logprobs = nullptr;            // optional (B,)
};

// probs = softmax(logits / T) over the last dim, fp32 out; T == 0 gives one-hot at the first argmax.
struct SoftmaxParams {
  const void* logits = nullptr;  // (B, V), element stride 1
  int64_t logits_row_stride = 0;
  DType dtype = DType::Float32;
  int64_t B = 0, V = 0;
  float temperature = 1.f;
  const float* temperatures = nullptr;  // optional (B,)
  float* probs = nullptr;               // (B, V) contiguous fp32
};

}  // namespace lmkern
