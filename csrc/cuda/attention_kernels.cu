// Host side of the attention CUDA kernels (csrc/include/lmkern/attention_decode.cuh,
// attention_prefill.cuh): argument checks, dtype and head-dim dispatch, the number of KV splits of
// the decode kernel and its workspace layout, and the launches. Framework-free (no torch): CI
// compiles this file alone with nvcc for sm_80 and sm_90a.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "lmkern/attention_cuda.h"
#include "lmkern/attention_decode.cuh"
#include "lmkern/attention_prefill.cuh"
#include "lmkern/launch_util.h"

namespace lmkern {
namespace {

using namespace launch;

using namespace attention_kernels;

static_assert(kCombineMaxSplits == kAttentionDecodeMaxSplits, "combine kernel sized for the cap");

// Splits of the decode heuristic: enough blocks for this many per SM ...
constexpr int64_t kDecodeTargetBlocksPerSm = 4;
// ... but no split shorter than this many keys (the combine costs a pass over the partials) ...
constexpr int64_t kDecodeMinKeysPerSplit = 256;
// ... and at most this many splits.
constexpr int64_t kDecodeMaxAutoSplits = 64;

// ------------------------------------------------------------------------------------------------
// Decode

// Query rows per block for R = (Hq / Hkv) * Sq rows per kv head.
int decode_rows(int64_t R) { return R <= 1 ? 1 : (R <= 4 ? 4 : 8); }

// Threads per key: the head dim's vectors over a power-of-two group of 4..32 threads.
int decode_tpk(int64_t nvec) {
  int tpk = 4;
  while (tpk < 32 && tpk < nvec) tpk *= 2;
  return tpk;
}

struct DecodePlan {
  int rows = 1;
  int64_t row_tiles = 0;
  int64_t blocks = 0;  // per split
  int splits = 1;
  size_t lse_offset = 0;
  size_t bytes = 0;
};

bool decode_params_ok(const AttentionDecodeParams& p) {
  if (p.B < 0 || p.Sq < 0 || p.Hq < 0 || p.Hkv <= 0 || p.num_splits < 0) return false;
  if (p.Smax < 0 || p.Smax > kAttentionDecodeMaxSlots) return false;
  if (p.Hq % p.Hkv != 0 || !attention_decode_cuda_head_dim_ok(p.D)) return false;
  const int64_t vec = 16 / int64_t(dtype_size(p.dtype));
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride,
                             p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                             p.v_batch_stride, p.v_row_stride, p.v_head_stride};
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  if (p.B * p.Hq * p.Sq == 0) return true;
  if (!aligned16(p.q) || p.cache_seqlens == nullptr || p.out == nullptr || p.lse == nullptr) {
    return false;
  }
  if (p.Smax > 0 && (!aligned16(p.k) || !aligned16(p.v))) return false;
  return true;
}

DecodePlan plan_decode(const AttentionDecodeParams& p, int num_sms) {
  DecodePlan plan;
  const int64_t R = (p.Hq / p.Hkv) * p.Sq;
  plan.rows = decode_rows(R);
  plan.row_tiles = ceil_div(R, plan.rows);
  plan.blocks = p.B * p.Hkv * plan.row_tiles;
  if (p.num_splits > 0) {
    plan.splits = std::min(p.num_splits, kAttentionDecodeMaxSplits);
  } else {
    const int64_t target = int64_t(num_sms) * kDecodeTargetBlocksPerSm;
    int64_t splits = 1;
    if (plan.blocks > 0 && plan.blocks < target) {
      splits = std::min({ceil_div(target, plan.blocks), ceil_div(p.Smax, kDecodeMinKeysPerSplit),
                         kDecodeMaxAutoSplits});
    }
    plan.splits = int(std::max<int64_t>(splits, 1));
  }
  if (plan.splits > 1) {
    const size_t rows = size_t(p.B) * size_t(p.Hq) * size_t(p.Sq) * size_t(plan.splits);
    plan.lse_offset = round_up(rows * size_t(p.D) * sizeof(float), 16);
    plan.bytes = plan.lse_offset + rows * sizeof(float);
  }
  return plan;
}

using DecodeKernel = void (*)(AttentionDecodeParams, int, float*, float*);

template <typename T, int TPK, int NV>
DecodeKernel decode_kernel_rows(int rows) {
  switch (rows) {
    case 1: return attention_decode_kernel<T, TPK, NV, 1>;
    case 4: return attention_decode_kernel<T, TPK, NV, 4>;
    case 8: return attention_decode_kernel<T, TPK, NV, 8>;
    default: return nullptr;
  }
}

template <typename T>
DecodeKernel decode_kernel(int64_t D, int rows) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int64_t nvec = D / VEC;
  const int tpk = decode_tpk(nvec);
  const int64_t nv = ceil_div(nvec, tpk);
  if (nv == 1) {
    switch (tpk) {
      case 4: return decode_kernel_rows<T, 4, 1>(rows);
      case 8: return decode_kernel_rows<T, 8, 1>(rows);
      case 16: return decode_kernel_rows<T, 16, 1>(rows);
      case 32: return decode_kernel_rows<T, 32, 1>(rows);
      default: return nullptr;
    }
  }
  // Only fp32 with D > 128 has two vectors per thread (D <= 256).
  if constexpr (VEC == 4) {
    if (nv == 2 && tpk == 32) return decode_kernel_rows<T, 32, 2>(rows);
  }
  return nullptr;
}

template <typename T>
cudaError_t launch_decode(const AttentionDecodeParams& p, const DecodePlan& plan, void* workspace,
                          cudaStream_t stream) {
  const DecodeKernel kernel = decode_kernel<T>(p.D, plan.rows);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  if (plan.blocks > INT32_MAX) return cudaErrorInvalidValue;
  float* o_part = nullptr;
  float* lse_part = nullptr;
  if (plan.splits > 1) {
    o_part = static_cast<float*>(workspace);
    lse_part = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.lse_offset);
  }
  const dim3 grid(unsigned(plan.blocks), unsigned(plan.splits));
  kernel<<<grid, kDecodeThreads, 0, stream>>>(p, int(plan.row_tiles), o_part, lse_part);
  LMKERN_TRY(cudaGetLastError());
  if (plan.splits > 1) {
    const int64_t BHS = p.B * p.Hq * p.Sq;
    const int64_t blocks = ceil_div(BHS, kCombineWarps);
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    attention_decode_combine_kernel<T><<<unsigned(blocks), kCombineWarps * 32, 0, stream>>>(
        o_part, lse_part, plan.splits, p.Hq, p.Sq, BHS, p.D, static_cast<T*>(p.out), p.lse);
    LMKERN_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------
// Forward (prefill)

bool fwd_params_ok(const AttentionFwdParams& p) {
  if (p.dtype == DType::Float32) return false;
  if (p.B < 0 || p.Hq < 0 || p.Hkv <= 0 || p.Sq < 0 || p.Sk < 0) return false;
  if (p.Sq > INT32_MAX || p.Sk > INT32_MAX) return false;  // the kernel counts key tiles in int
  if (p.Hq % p.Hkv != 0 || !attention_fwd_cuda_head_dim_ok(p.D)) return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  if (p.cu_seqlens_q != nullptr && p.bias != nullptr) return false;
  if (p.B > 65535 || p.Hq > 65535) return false;
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride,
                             p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                             p.v_batch_stride, p.v_row_stride, p.v_head_stride};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  if (p.Sq == 0 || p.B == 0 || p.Hq == 0) return true;
  if (!aligned16(p.q) || p.out == nullptr || p.lse == nullptr) return false;
  if (p.Sk > 0 && (!aligned16(p.k) || !aligned16(p.v))) return false;
  return true;
}

template <typename T, int D>
cudaError_t launch_fwd_d(const AttentionFwdParams& p, int num_sms, cudaStream_t stream) {
  using Cfg = PrefillConfig<D>;
  const auto kernel = attention_prefill_kernel<T, D>;
  const size_t smem = Cfg::kSmemBytes;
  if (smem > 48 * 1024) {
    LMKERN_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)));
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t rows = packed ? std::max<int64_t>(p.max_seqlen_q, 1) : p.Sq;
  // Packed: every block strides over its sequence's row blocks, so a too-small max_seqlen_q
  // costs time, not results; cap the grid for a too-large one.
  int64_t m_blocks = ceil_div(rows, Cfg::kBlockM);
  if (packed) {
    m_blocks = std::min<int64_t>(m_blocks, ceil_div(p.Sq, Cfg::kBlockM));
    m_blocks = std::max<int64_t>(m_blocks, 1);
  }
  (void)num_sms;
  if (m_blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(m_blocks), unsigned(p.Hq), unsigned(p.B));
  kernel<<<grid, kPrefillThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const AttentionFwdParams& p, int num_sms, cudaStream_t stream) {
  switch (p.D) {
    case 32: return launch_fwd_d<T, 32>(p, num_sms, stream);
    case 64: return launch_fwd_d<T, 64>(p, num_sms, stream);
    case 80: return launch_fwd_d<T, 80>(p, num_sms, stream);
    case 96: return launch_fwd_d<T, 96>(p, num_sms, stream);
    case 128: return launch_fwd_d<T, 128>(p, num_sms, stream);
    case 160: return launch_fwd_d<T, 160>(p, num_sms, stream);
    case 192: return launch_fwd_d<T, 192>(p, num_sms, stream);
    case 256: return launch_fwd_d<T, 256>(p, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int attention_decode_cuda_num_splits(const AttentionDecodeParams& p, int num_sms) {
  if (!decode_params_ok(p) || num_sms <= 0) return 1;
  return plan_decode(p, num_sms).splits;
}

cudaError_t attention_decode_cuda_workspace_bytes(const AttentionDecodeParams& p, int num_sms,
                                                  size_t* bytes) {
  if (bytes == nullptr || num_sms <= 0 || !decode_params_ok(p)) return cudaErrorInvalidValue;
  *bytes = 0;
  if (p.B * p.Hq * p.Sq == 0) return cudaSuccess;
  *bytes = plan_decode(p, num_sms).bytes;
  return cudaSuccess;
}

cudaError_t attention_decode_cuda(const AttentionDecodeParams& p, void* workspace,
                                  size_t workspace_bytes, int num_sms, cudaStream_t stream) {
  if (num_sms <= 0 || !decode_params_ok(p)) return cudaErrorInvalidValue;
  if (p.B * p.Hq * p.Sq == 0) return cudaSuccess;
  const DecodePlan plan = plan_decode(p, num_sms);
  if (workspace_bytes < plan.bytes ||
      (plan.bytes > 0 && (workspace == nullptr || !aligned16(workspace)))) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_decode<T>(p, plan, workspace, stream);
  });
}

cudaError_t attention_fwd_cuda(const AttentionFwdParams& p, int num_sms, cudaStream_t stream) {
  if (num_sms <= 0 || !fwd_params_ok(p)) return cudaErrorInvalidValue;
  if (p.Sq == 0 || p.B == 0 || p.Hq == 0) return cudaSuccess;
  if (p.dtype == DType::Float16) return launch_fwd<__half>(p, num_sms, stream);
  return launch_fwd<__nv_bfloat16>(p, num_sms, stream);
}

}  // namespace lmkern
