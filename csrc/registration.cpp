// Every lmkern operator schema, in one place. Implementations are registered per dispatch key
// next to their kernels (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cpp for CUDA); fake (meta)
// implementations and autograd formulas are registered from Python, one module per op family
// under lmkern/ops/, which `import lmkern` loads. (No set_python_module: torch requires every
// fake of a library to live in that one module.)
#include <torch/library.h>

TORCH_LIBRARY(lmkern, m) {
  // Normalization over the last dim of a 2-D input (M, N); the Python layer flattens leading
  // dims and normalized_shape. `residual`, when given, is added first: residual_out = input +
  // residual (rounded to input's dtype) and the norm is taken of residual_out. Without a
  // residual, residual_out is an empty tensor. mean/rstd are fp32 per-row statistics saved for
  // backward. weight/bias may be input's dtype or float32; out has input's dtype.
  m.def(
      "layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
      "float weight_offset) -> (Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  // `input` is the tensor that was normalized (residual_out when a residual was fused);
  // grad_residual, the gradient flowing into residual_out, is added to grad_input.
  // grad_weight/grad_bias are empty when weight/bias is None.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor? grad_residual, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor rstd, float weight_offset) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm_fwd(Tensor input, Tensor? weight, Tensor? residual, float eps, "
      "float weight_offset) -> (Tensor out, Tensor residual_out, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_out, Tensor? grad_residual, Tensor input, Tensor? weight, "
      "Tensor rstd, float weight_offset) -> (Tensor grad_input, Tensor grad_weight)");

  // One token per row of 2-D logits (B, V); the math is lmkern/reference/sampling.py. Each
  // optional (B,) tensor replaces its scalar (temperatures fp32, top_ks int64, top_ps/min_ps
  // fp32, seeds int64). ids is int64 (B,), -1 for an invalid row; logprobs is fp32 (B,), or empty
  // when need_logprobs is false. Not differentiable. seed and top_k are SymInt so that under
  // torch.compile a changing value stays a graph input instead of recompiling per value; the C++
  // kernels still take them as int64_t.
  m.def(
      "sample(Tensor logits, float temperature, SymInt top_k, float top_p, float min_p, "
      "Tensor? temperatures, Tensor? top_ks, Tensor? top_ps, Tensor? min_ps, SymInt seed, "
      "Tensor? seeds, bool need_logprobs) -> (Tensor ids, Tensor logprobs)");
  // fp32 softmax(logits / T) of 2-D logits over the last dim; temperatures (B,) fp32 replaces T.
  m.def("softmax(Tensor logits, float temperature, Tensor? temperatures) -> Tensor");

  // Attention, one core for every public attention function (lmkern/ops/attention.py maps
  // sdpa, flash_attention and attention_with_kvcache onto it; the contract is documented there).
  // q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), any strides with unit stride in the last dim; or
  // packed (total, H, D) with int32 cu_seqlens_q/k (B + 1,). bias: optional fp32 additive
  // (-inf = masked), a 4-D view broadcast to (B, Hq, Sq, Sk) (strides may be 0). seqused_k:
  // optional int32 (B,), sequence b reads only its first seqused_k[b] keys. causal: key j is
  // visible to query i iff j <= i + (causal_top_left ? 0 : Sk_b - Sq_b). Returns out (q's
  // shape and dtype, contiguous) and fp32 lse (B, Hq, Sq), or (Hq, total_q) when packed; a row
  // that sees no key has out 0 and lse -inf. And, for the backward, fp32 stats (2,) + lse's
  // shape: each row's max score m and the log of its sum of exp(score - m), in the kernel's own
  // units (natural log on the CPU; base 2 on CUDA, whose scores are scaled by log2(e)); -inf
  // and 0 for a row that sees no key. The backward needs both: where scores are near float32's
  // min (Hugging Face's masks), lse = m + log-sum rounds to m.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "bool causal, bool causal_top_left, float scale) -> (Tensor out, Tensor lse, Tensor stats)");
  // Gradients of attention_fwd's (out, lse) with respect to q, k, v, for the same arguments
  // (whatever attention_fwd takes, this takes), given out and stats as it returned them on this
  // device: grad_out (q's shape and dtype, unit stride in the last dim) and optionally grad_lse
  // (lse's shape, fp32). Returns dq, dk, dv in q's dtype, contiguous, in q's/k's/v's shapes;
  // with GQA dk and dv sum over each group's query heads. The bias gets no gradient. Rows whose
  // max is -inf (no visible key) give and get zero gradient; keys past seqused_k get zero
  // gradient.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor stats, Tensor? bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? seqused_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, "
      "bool causal_top_left, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decoding against a KV cache (few queries, long cache): q (B, Sq, Hq, D), caches
  // (B, Smax, Hkv, D), cache_seqlens int32 (B,); causal bottom-right within each row's prefix.
  // num_splits: how many parts each row's keys are split into (0 = the kernel's heuristic).
  m.def(
      "attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "bool causal, float scale, int num_splits) -> (Tensor out, Tensor lse)");
}
