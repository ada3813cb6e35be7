// Framework-free description of the attention CUDA kernels: plain pointers, sizes and strides.
// Shared by the kernels (csrc/include/lmkern/attention_decode.cuh), their
// launchers (csrc/cuda/attention_kernels.cu) and the torch glue (csrc/cuda/attention_cuda.cpp).
// No torch include here. The math is specified in lmkern/reference/attention.py: per query row,
// s_j = scale * <q, k_j> (+ bias) over the visible keys, lse = logsumexp_j s_j (fp32),
// out = sum_j exp(s_j - lse) v_j; a row that sees no key has out 0 and lse -inf.
//
// Strides are in elements; every tensor has unit stride in its last (head) dimension.
#pragma once
#include <cstdint>

#include "lmkern/norm.h"  // DType

namespace lmkern {

// Decoding against a KV cache: q (B, Sq, Hq, D), caches (B, Smax, Hkv, D), row b reads only its
// first L_b = clamp(cache_seqlens[b], 0, Smax) cache entries. Query head h reads kv head
// h / (Hq / Hkv). causal: query i sees key j iff j <= i + cache_seqlens[b] - Sq (the unclamped
// length, as in the reference; equal to L_b for every valid cache_seqlens).
struct AttentionDecodeParams {
  const void* q = nullptr;  // (B, Sq, Hq, D)
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  const void* k = nullptr;  // (B, Smax, Hkv, D)
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  const void* v = nullptr;  // (B, Smax, Hkv, D)
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  const int32_t* cache_seqlens = nullptr;  // (B,) contiguous
  void* out = nullptr;                     // (B, Sq, Hq, D) contiguous, dtype
  float* lse = nullptr;                    // (B, Hq, Sq) contiguous
  int64_t B = 0, Sq = 0, Hq = 0, Hkv = 0, D = 0, Smax = 0;
  float scale = 1.f;
  bool causal = false;
  int num_splits = 0;  // parts each row's keys are split into; 0 = attention_decode_cuda's choice
  DType dtype = DType::Float16;
};

}  // namespace lmkern
