// Framework-free entry points of the attention CUDA kernels (csrc/cuda/attention_kernels.cu).
// Plain C++: the only CUDA types are cudaStream_t and cudaError_t. All calls are asynchronous on
// `stream` and act on the current CUDA device; the pointers in the params must live on it.
// num_sms is that device's multiprocessor count (cudaDeviceProp::multiProcessorCount).
// Unsupported params (see the limits below) return cudaErrorInvalidValue and launch nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "lmkern/attention.h"

namespace lmkern {

// ---------------------------------------------------------------------------------------------
// Decode (split-KV flash-decoding). Limits: dtype fp32, fp16 or bf16; D a multiple of 8 in
// [8, 256]; Hq a multiple of Hkv; Smax <= 2^30; q, k, v 16-byte aligned with every stride a
// multiple of 16 / sizeof(element); B * Hkv * ceil(Hq / Hkv * Sq / rows per block) < 2^31.

constexpr int64_t kAttentionDecodeMaxHeadDim = 256;
constexpr int64_t kAttentionDecodeMaxSlots = int64_t(1) << 30;  // Smax limit (int key indices)
constexpr int kAttentionDecodeMaxSplits = 256;  // larger num_splits are reduced to this

inline bool attention_decode_cuda_head_dim_ok(int64_t D) {
  return D >= 8 && D <= kAttentionDecodeMaxHeadDim && D % 8 == 0;
}

// The number of splits attention_decode_cuda uses for these params: p.num_splits when > 0
// (at most kAttentionDecodeMaxSplits), else a heuristic from B * Hkv, Smax and num_sms.
int attention_decode_cuda_num_splits(const AttentionDecodeParams& p, int num_sms);

// Size in bytes of the device scratch memory attention_decode_cuda needs: 0 with one split, else
// splits * B * Hq * Sq * (D + 1) * 4 (fp32 partial outputs and log-sum-exps).
cudaError_t attention_decode_cuda_workspace_bytes(const AttentionDecodeParams& p, int num_sms,
                                                  size_t* bytes);

// out and lse as documented in attention.h. workspace: at least
// attention_decode_cuda_workspace_bytes bytes of device memory, 16-byte aligned, contents
// irrelevant (nullptr when that size is 0); in use until the work on `stream` ends.
// B * Hq * Sq == 0 launches nothing.
cudaError_t attention_decode_cuda(const AttentionDecodeParams& p, void* workspace,
                                  size_t workspace_bytes, int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Forward (FlashAttention-2 style, mma.sync m16n8k16 with fp32 accumulation). Limits: dtype fp16
// or bf16; D in {32, 64, 80, 96, 128, 160, 192, 256}; Hq a multiple of Hkv; q, k, v 16-byte
// aligned with every stride a multiple of 8 elements; bias only with dense inputs;
// B, Hq <= 65535.

inline bool attention_fwd_cuda_head_dim_ok(int64_t D) {
  return D == 32 || D == 64 || D == 80 || D == 96 || D == 128 || D == 160 || D == 192 ||
         D == 256;
}

cudaError_t attention_fwd_cuda(const AttentionFwdParams& p, int num_sms, cudaStream_t stream);

}  // namespace lmkern
