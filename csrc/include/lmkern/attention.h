// Framework-free description of the attention CUDA kernels: plain pointers, sizes and strides.
// Shared by the kernels (csrc/include/lmkern/attention_decode.cuh, attention_prefill.cuh), their
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

// Prefill / training forward. Dense: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D). Packed (varlen,
// cu_seqlens_q != nullptr): q (total_q, Hq, D), k and v (total_k, Hkv, D), sequence b is rows
// cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v (the batch
// strides are then unused; the kernels clamp every cu_seqlens value to [0, total]). Sequence b has
// Sq_b queries and Sk_b keys, Sk_b reduced to seqused_k[b] when seqused_k is set (clamped to
// [0, Sk_b]). causal: key j visible to query i iff j <= i + (causal_top_left ? 0 : Sk_b - Sq_b).
// Packed rows outside every sequence (before cu_seqlens_q[0], from cu_seqlens_q[B] on) get out 0,
// lse -inf.
struct AttentionFwdParams {
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  const void* k = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  const void* v = nullptr;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  // optional fp32 additive bias, element (b, h, i, j) at
  // b * bias_batch_stride + h * bias_head_stride + i * bias_row_stride + j * bias_col_stride
  // (any strides, 0 to broadcast); dense inputs only
  const float* bias = nullptr;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  const int32_t* cu_seqlens_q = nullptr;  // (B + 1,) contiguous; set together with cu_seqlens_k
  const int32_t* cu_seqlens_k = nullptr;  // (B + 1,) contiguous
  const int32_t* seqused_k = nullptr;     // optional (B,) contiguous
  void* out = nullptr;  // q's shape, contiguous, dtype
  float* lse = nullptr;  // (B, Hq, Sq) contiguous, or (Hq, total_q) when packed
  // Optional, laid out like lse: each row's max score and log2 of its sum of exp2(score - max),
  // scores in the log2 domain (scale * log2(e)); -inf and 0 for a row that sees no key. A
  // backward recomputes P = exp2((s - max) - log_sum) from them: near float32's min (Hugging
  // Face's masks) lse = max + log_sum rounds to max.
  float* row_max = nullptr;
  float* row_log_sum = nullptr;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t Sq = 0, Sk = 0;            // dense: sequence lengths; packed: total_q, total_k
  int64_t max_seqlen_q = 0;          // packed: grid sizing hint (any value >= 1 is correct)
  float scale = 1.f;
  bool causal = false;
  bool causal_top_left = false;
  DType dtype = DType::Float16;
};

}  // namespace lmkern
