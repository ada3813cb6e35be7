// CUDA implementation of lmkern::attention_decode (attention_fwd to come): the argument
// checks, the output and scratch allocation, then the framework-free launchers
// (csrc/cuda/attention_kernels.cu) on the current stream of q's device. What the kernels accept
// is listed in lmkern/attention_cuda.h; everything else is rejected here with an error naming the
// argument. No host synchronization: device values (cache_seqlens) are
// only read by the kernels, which clamp them to the tensors' extents.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "glue_common.h"
#include "lmkern/attention_cuda.h"

namespace lmkern {
namespace {

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "lmkern.", op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_device(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "lmkern.", op, ": q must be a CUDA tensor, got ", q.device());
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// `t` lives on q's device.
void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), "lmkern.", op, ": ", arg, " is on ", t.device(),
                    " but q is on ", q.device());
}

// k/v: q's dtype and device.
void check_like_q(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q) {
  check_same_device(op, arg, t, q);
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "lmkern.", op, ": ", arg,
                   " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

// An int32 (n,) tensor on q's device, contiguous (a copy only when it is not).
at::Tensor int32_vector(const char* op, const char* arg, const at::Tensor& t, int64_t n,
                        const at::Tensor& q) {
  check_same_device(op, arg, t, q);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "lmkern.", op, ": ", arg,
                   " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "lmkern.", op, ": ", arg,
                    " must have shape (", n, ",), got ", t.sizes());
  return t.contiguous();
}

// q/k/v as the kernels read them: unit stride in the last dim, data 16-byte aligned and every
// other stride a multiple of 16 bytes, so that a thread moves 16 bytes per access. Anything else
// (e.g. a view starting mid-row) is copied to a fresh contiguous tensor (the caching allocator
// aligns it).
at::Tensor vector_loadable(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) <= 1) continue;
    ok = ok && (d == t.dim() - 1 ? t.stride(d) == 1 : t.stride(d) % vec == 0);
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// A stride as the kernels take it: 0 for a dim of size <= 1 (never stepped along, and so never
// required to be a multiple of anything).
int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) <= 1 ? 0 : t.stride(d); }

std::tuple<at::Tensor, at::Tensor> attention_decode_op(const at::Tensor& q,
                                                       const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache,
                                                       const at::Tensor& cache_seqlens,
                                                       bool causal, double scale,
                                                       int64_t num_splits) {
  constexpr const char* op = "attention_decode";
  check_device(op, q);
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK_VALUE(q.dim() == 4, "lmkern.", op,
                    ": q must be 4-D (batch, seqlen_q, heads, head_dim), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "lmkern.", op,
                    ": k_cache must be 4-D (batch, seqlen_cache, kv_heads, head_dim), got shape ",
                    k_cache.sizes());
  check_like_q(op, "k_cache", k_cache, q);
  check_like_q(op, "v_cache", v_cache, q);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "lmkern.", op,
                    ": v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
                    v_cache.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Smax = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == B, "lmkern.", op, ": k_cache has batch size ",
                    k_cache.size(0), " but q has ", B);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "lmkern.", op, ": k_cache has head_dim ",
                    k_cache.size(3), " but q has ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "lmkern.", op,
                    ": the number of query heads (", Hq,
                    ") must be a multiple of the number of key/value heads (", Hkv, ")");
  const DType dtype = kernel_dtype(op, "q", q.scalar_type());
  TORCH_CHECK_VALUE(attention_decode_cuda_head_dim_ok(D), "lmkern.", op,
                    ": the CUDA kernel supports head_dim a multiple of 8 in [8, ",
                    kAttentionDecodeMaxHeadDim, "], got ", D);
  TORCH_CHECK_VALUE(Smax <= std::numeric_limits<int32_t>::max(), "lmkern.", op,
                    ": k_cache has more than 2^31 - 1 slots per row (", Smax, ")");
  TORCH_CHECK_VALUE(num_splits >= 0, "lmkern.", op, ": num_splits must be >= 0, got ",
                    num_splits);
  const at::Tensor lens = int32_vector(op, "cache_seqlens", cache_seqlens, B, q);

  const at::Tensor qv = vector_loadable(q);
  const at::Tensor kv = vector_loadable(k_cache);
  const at::Tensor vv = vector_loadable(v_cache);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  AttentionDecodeParams p;
  p.q = qv.data_ptr();
  p.q_batch_stride = stride_of(qv, 0);
  p.q_row_stride = stride_of(qv, 1);
  p.q_head_stride = stride_of(qv, 2);
  p.k = kv.numel() > 0 ? kv.data_ptr() : nullptr;
  p.k_batch_stride = stride_of(kv, 0);
  p.k_row_stride = stride_of(kv, 1);
  p.k_head_stride = stride_of(kv, 2);
  p.v = vv.numel() > 0 ? vv.data_ptr() : nullptr;
  p.v_batch_stride = stride_of(vv, 0);
  p.v_row_stride = stride_of(vv, 1);
  p.v_head_stride = stride_of(vv, 2);
  p.cache_seqlens = lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = B;
  p.Sq = Sq;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.Smax = Smax;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.num_splits = static_cast<int>(std::min<int64_t>(num_splits, kAttentionDecodeMaxSplits));
  p.dtype = dtype;

  // Partial results of the KV splits (fp32, O(splits * B * Hq * Sq * D)) from the caching
  // allocator on the current stream: freeing it when this function returns is safe, later work
  // on the stream runs after the kernels.
  const int sms = num_sms();
  size_t bytes = 0;
  check_cuda(attention_decode_cuda_workspace_bytes(p, sms, &bytes), op);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  }
  check_cuda(attention_decode_cuda(p, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, sms,
                                   at::cuda::getCurrentCUDAStream()),
             op);
  return {out, lse};
}

}  // namespace
}  // namespace lmkern

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("attention_decode", &lmkern::attention_decode_op);
}
