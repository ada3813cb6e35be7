// CUDA implementations of lmkern::attention_fwd and lmkern::attention_decode: the argument
// checks, the output and scratch allocation, then the framework-free launchers
// (csrc/cuda/attention_kernels.cu) on the current stream of q's device. What the kernels accept
// is listed in lmkern/attention_cuda.h; everything else is rejected here with an error naming the
// argument. No host synchronization: device values (cache_seqlens, cu_seqlens, seqused_k) are
// only read by the kernels, which clamp them to the tensors' extents.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda_glue.h"
#include "glue_common.h"
#include "lmkern/attention_cuda.h"

namespace lmkern {
namespace {

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
  check_cuda_tensor(op, "q", q);
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
  TORCH_CHECK_VALUE(Smax <= kAttentionDecodeMaxSlots, "lmkern.", op,
                    ": the CUDA kernel supports at most 2^30 cache slots per row, k_cache has ",
                    Smax);
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
                                   current_stream()),
             op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, bool causal_top_left,
    double scale) {
  constexpr const char* op = "attention_fwd";
  (void)max_seqlen_k;  // the kernel walks each sequence's keys; no sizing needed
  check_cuda_tensor(op, "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "lmkern.",
                   op, ": the CUDA kernel supports float16 and bfloat16 q, k, v, got ",
                   q.scalar_type());
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  const bool packed = cu_seqlens_q.has_value();
  TORCH_CHECK_VALUE(packed == cu_seqlens_k.has_value(), "lmkern.", op,
                    ": cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t nd = packed ? 3 : 4;
  TORCH_CHECK_VALUE(q.dim() == nd, "lmkern.", op, ": q must be ",
                    packed ? "3-D (total_q, heads, head_dim) with cu_seqlens"
                           : "4-D (batch, seqlen_q, heads, head_dim)",
                    ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == nd, "lmkern.", op, ": k must be ",
                    packed ? "3-D (total_k, kv_heads, head_dim) with cu_seqlens"
                           : "4-D (batch, seqlen_k, kv_heads, head_dim)",
                    ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "lmkern.", op, ": v must have k's shape ",
                    k.sizes(), " (the CUDA kernel needs head_dim_v == head_dim), got ",
                    v.sizes());
  const int64_t D = q.size(nd - 1), Hq = q.size(nd - 2), Hkv = k.size(nd - 2);
  TORCH_CHECK_VALUE(k.size(nd - 1) == D, "lmkern.", op, ": k has head_dim ", k.size(nd - 1),
                    " but q has ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "lmkern.", op,
                    ": the number of query heads (", Hq,
                    ") must be a multiple of the number of key/value heads (", Hkv, ")");
  TORCH_CHECK_VALUE(attention_fwd_cuda_head_dim_ok(D), "lmkern.", op,
                    ": the CUDA kernel supports head_dim 32, 64, 80, 96, 128, 160, 192 or 256, "
                    "got ", D);
  if (packed) {
    TORCH_CHECK_VALUE(cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) >= 1, "lmkern.", op,
                      ": cu_seqlens_q must have shape (batch + 1,), got ", cu_seqlens_q->sizes());
  }
  const int64_t B = packed ? cu_seqlens_q->size(0) - 1 : q.size(0);
  const int64_t Sq = packed ? q.size(0) : q.size(1);  // packed: total_q
  const int64_t Sk = packed ? k.size(0) : k.size(1);  // packed: total_k
  if (!packed) {
    TORCH_CHECK_VALUE(k.size(0) == B, "lmkern.", op, ": k has batch size ", k.size(0),
                      " but q has ", B);
  }
  TORCH_CHECK_VALUE(B <= 65535 && Hq <= 65535, "lmkern.", op,
                    ": the CUDA kernel supports at most 65535 sequences and 65535 query heads, "
                    "got ", B, " and ", Hq);
  TORCH_CHECK_VALUE(Sq <= std::numeric_limits<int32_t>::max() &&
                        Sk <= std::numeric_limits<int32_t>::max(),
                    "lmkern.", op,
                    ": the CUDA kernel supports at most 2^31 - 1 query and key rows");

  at::Tensor cu_q, cu_k, used;
  if (packed) {
    cu_q = int32_vector(op, "cu_seqlens_q", *cu_seqlens_q, B + 1, q);
    cu_k = int32_vector(op, "cu_seqlens_k", *cu_seqlens_k, B + 1, q);
  }
  if (seqused_k.has_value()) used = int32_vector(op, "seqused_k", *seqused_k, B, q);

  at::Tensor bias_t;
  int64_t bias_strides[4] = {0, 0, 0, 0};
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(!packed, "lmkern.", op,
                      ": bias with packed (cu_seqlens) inputs is not supported by the CUDA kernel");
    check_same_device(op, "bias", *bias, q);
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "lmkern.", op,
                     ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 4, "lmkern.", op,
                      ": bias must be a 4-D view of (batch, heads, seqlen_q, seqlen_k), got shape ",
                      bias->sizes());
    const int64_t target[4] = {B, Hq, Sq, Sk};
    for (int64_t d = 0; d < 4; ++d) {
      TORCH_CHECK_VALUE(bias->size(d) == target[d] || bias->size(d) == 1, "lmkern.", op,
                        ": bias of shape ", bias->sizes(), " does not broadcast to (", B, ", ",
                        Hq, ", ", Sq, ", ", Sk, ")");
      bias_strides[d] = bias->size(d) == 1 ? 0 : bias->stride(d);
    }
    bias_t = *bias;
  }

  const at::Tensor qv = vector_loadable(q);
  const at::Tensor kv = vector_loadable(k);
  const at::Tensor vv = vector_loadable(v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const std::vector<int64_t> lse_shape = packed ? std::vector<int64_t>{Hq, Sq}
                                                 : std::vector<int64_t>{B, Hq, Sq};
  std::vector<int64_t> stats_shape = lse_shape;
  stats_shape.insert(stats_shape.begin(), 2);
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  at::Tensor stats = at::empty(stats_shape, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse, stats};
  if (B == 0) {  // packed rows without any sequence
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    stats[0].fill_(-std::numeric_limits<float>::infinity());
    stats[1].zero_();
    return {out, lse, stats};
  }

  AttentionFwdParams p;
  const int64_t o = packed ? 1 : 0;  // packed tensors have no batch dim
  p.q = qv.data_ptr();
  p.q_batch_stride = packed ? 0 : stride_of(qv, 0);
  p.q_row_stride = stride_of(qv, 1 - o);
  p.q_head_stride = stride_of(qv, 2 - o);
  p.k = kv.numel() > 0 ? kv.data_ptr() : nullptr;
  p.k_batch_stride = packed ? 0 : stride_of(kv, 0);
  p.k_row_stride = stride_of(kv, 1 - o);
  p.k_head_stride = stride_of(kv, 2 - o);
  p.v = vv.numel() > 0 ? vv.data_ptr() : nullptr;
  p.v_batch_stride = packed ? 0 : stride_of(vv, 0);
  p.v_row_stride = stride_of(vv, 1 - o);
  p.v_head_stride = stride_of(vv, 2 - o);
  if (bias_t.defined()) {
    p.bias = bias_t.data_ptr<float>();
    p.bias_batch_stride = bias_strides[0];
    p.bias_head_stride = bias_strides[1];
    p.bias_row_stride = bias_strides[2];
    p.bias_col_stride = bias_strides[3];
  }
  if (packed) {
    p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  }
  if (used.defined()) p.seqused_k = used.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.row_max = stats.data_ptr<float>();
  p.row_log_sum = p.row_max + lse.numel();
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.Sq = Sq;
  p.Sk = Sk;
  p.max_seqlen_q = max_seqlen_q;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.causal_top_left = causal_top_left;
  p.dtype = kernel_dtype(op, "q", q.scalar_type());
  check_cuda(attention_fwd_cuda(p, num_sms(), current_stream()), op);
  return {out, lse, stats};
}

}  // namespace
}  // namespace lmkern

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("attention_fwd", &lmkern::attention_fwd_op);
  m.impl("attention_decode", &lmkern::attention_decode_op);
}
