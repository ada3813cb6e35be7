"""Attention in plain PyTorch: the specification every lmkern attention kernel implements.

Three entry points, one core. Every one computes, per (batch, query head, query row i):

    s_j   = scale * <q_i, k_j>            over the keys j the row may attend (see below)
    m     = max_j s_j
    lse   = m + log(sum_j exp(s_j - m))   (the row's log-sum-exp, kept in float32)
    o_i   = sum_j exp(s_j - lse) * v_j

with ``scale = 1 / sqrt(head_dim)`` unless given. Conventions shared by all three:

* **Precision.** With ``upcast=True`` (the default) q, k, v are converted to float32 before any
  arithmetic (float64 inputs stay float64) and the output is rounded once to the input dtype.
  ``upcast=False`` computes in the input dtype, which is what "PyTorch's own low-precision
  computation" means in the flash-attention 2x error rule the kernel tests use.
* **Grouped-query attention.** With Hq query heads and Hkv key/value heads (Hq a multiple of
  Hkv), query head h reads key/value head ``h // (Hq // Hkv)`` (torch's ``repeat_interleave``
  in enable_gqa, and flash-attn's convention). Hkv == 1 is multi-query attention.
* **Fully masked rows.** A query row that may attend no key at all (every key masked, a causal
  row before the first key, a sequence without keys) returns **zeros**, its lse is ``-inf``, and
  every gradient through it is zero (never NaN). torch's math backend (CPU) returns zeros too
  (checked with torch 2.13), but older versions and some fused backends have returned NaN:
  lmkern's answer is zeros on every backend.
* **NaN propagates.** A row whose visible scores include a NaN (a NaN in its query, in a key it
  sees, or in its bias) has output NaN and lse **NaN**, not -inf: -inf says "this row saw no key"
  (zero weight when lse values are merged, zero gradient), which is not true of it. Its gradients
  are NaN as well. Masked keys and slots past a cache's length are not visible.
* **Causal masks** differ between the two APIs, as they do upstream:
  ``sdpa(is_causal=True)`` is torch's, aligned to the **top left**: query i attends keys
  ``j <= i``; ``flash_attention(causal=True)`` and ``attention_with_kvcache`` are flash-attn's,
  aligned to the **bottom right**: query i attends keys ``j <= i + Sk - Sq`` (the last query
  sees every key; with Sq > Sk the first Sq - Sk rows see none and are zeros).

The reference builds the full (Sq, Sk) score matrix; it is meant to be obviously right, not
frugal. It is plain differentiable PyTorch (autograd and torch.compile trace straight through it)
and makes no host synchronization, also for varlen and kv-cache inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["attention_core", "sdpa", "flash_attention", "attention_with_kvcache", "compute_dtype"]


def compute_dtype(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """The dtype the reference computes in: float32 for 16-bit inputs when ``upcast``, else the input's."""
    if dtype == torch.float64 or not upcast:
        return dtype
    return torch.float32


def attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    allowed: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention on (..., H, Sq, D) / (..., H, Sk, D) / (..., H, Sk, Dv) tensors
    with equal head counts (GQA already expanded).

    ``allowed``: bool, broadcastable to (..., H, Sq, Sk), True where the query may attend the key.
    ``bias``: float, broadcastable likewise, added to the scaled scores (``-inf`` masks a key).
    ``dropout_p``: dropout on the normalized probabilities (torch.nn.functional.dropout, drawn from
    torch's global RNG; kept probabilities are scaled by 1 / (1 - p)), as torch's math backend does.

    Returns (out in q's dtype, (..., H, Sq, Dv); lse in float32, or float64 for float64 inputs,
    (..., H, Sq)). Fully masked rows: out 0, lse -inf, zero gradients.
    """
    ct = compute_dtype(q.dtype, upcast)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    s = torch.matmul(qc, kc.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.to(ct)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if s.shape[-1] == 0:
        m = s.new_full(s.shape[:-1] + (1,), float("-inf"))
    else:
        m = s.amax(dim=-1, keepdim=True)
    # Rows with no allowed key have m = -inf; shifting them by 0 keeps exp() at exactly 0
    # instead of exp(-inf - -inf) = NaN. detach: the shift cancels in the result, as in softmax.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    # l == 0 only when the row sees no key (otherwise its max scores exp(0) = 1). A NaN l (NaN
    # among the scores) is not such a row: it keeps its NaN, in the output and in the lse.
    no_key = l == 0
    l_safe = torch.where(no_key, torch.ones_like(l), l)
    probs = p / l_safe
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vc)
    lse = torch.where(no_key, torch.full_like(l, float("-inf")), m_safe + torch.log(l_safe)).squeeze(-1)
    lse_dtype = torch.float64 if ct == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)


def _expand_kv_heads(k: Tensor, v: Tensor, hq: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Repeats each key/value head ``hq // hkv`` times along dim ``head_dim`` (GQA/MQA)."""
    hkv = k.shape[head_dim]
    if hkv == hq:
        return k, v
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the key/value heads ({hkv})")
    r = hq // hkv
    return k.repeat_interleave(r, dim=head_dim), v.repeat_interleave(r, dim=head_dim)


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    upcast: bool = True,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, lmkern's specification of it.

    Shapes: q (..., Hq, L, D), k (..., Hkv, S, D), v (..., Hkv, S, Dv) -> (..., Hq, L, Dv).
    Hkv == Hq, or with ``enable_gqa`` any divisor of Hq (query head h reads head h // (Hq / Hkv)).

    ``attn_mask`` broadcasts to (..., Hq, L, S): bool (True = attend) or floating (added to the
    scaled scores; ``-inf`` masks). ``is_causal``: torch's top-left convention, query i attends
    keys j <= i whatever L and S (not with ``attn_mask``). ``scale`` defaults to 1/sqrt(D).
    ``dropout_p`` > 0 drops probabilities with torch's global RNG (torch.nn.functional.dropout),
    so the result is reproducible with torch.manual_seed but is not any kernel's random stream.
    Fully masked rows return zeros (see module doc).
    """
    if attn_mask is not None and is_causal:
        raise ValueError("sdpa: pass attn_mask or is_causal=True, not both")
    hq = q.shape[-3] if q.dim() >= 3 else 1
    if enable_gqa:
        k, v = _expand_kv_heads(k, v, hq, -3)
    L, S = q.shape[-2], k.shape[-2]
    allowed = bias = None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            bias = attn_mask
    out, _ = attention_core(q, k, v, _default_scale(scale, q.shape[-1]), allowed, bias, dropout_p, upcast)
    return out


def bottom_right_causal(len_q: Tensor, len_k: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
    """flash-attn's causal rule, broadcasting: key pos_k visible to query pos_q iff
    pos_k <= pos_q + len_k - len_q."""
    return pos_k <= pos_q + (len_k - len_q)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    upcast: bool = True,
):
    """flash-attn's flash_attn_func / flash_attn_varlen_func, lmkern's specification of them.

    Dense: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq).
    Varlen (``cu_seqlens_q`` and ``cu_seqlens_k`` given): q (total_q, Hq, D), k and v
    (total_k, Hkv, D) hold B sequences packed back to back; sequence b is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v
    (int32, (B+1,), starting at 0, non-decreasing). Each sequence attends only to itself;
    out (total_q, Hq, D), lse (Hq, total_q). ``max_seqlen_*`` are sizing hints for kernels and
    unused here (the caller validates them).

    Hkv divides Hq (GQA/MQA). ``causal``: bottom-right aligned per sequence, query i attends keys
    j <= i + Sk - Sq. lse is float32 (float64 for float64 inputs), -inf on fully masked rows
    (whose output is zeros). Returns out, or (out, lse) with ``return_lse``.
    """
    del max_seqlen_q, max_seqlen_k
    scale = _default_scale(softmax_scale, q.shape[-1])
    if cu_seqlens_q is None:
        # (B, S, H, D) -> (B, H, S, D)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kt, vt = _expand_kv_heads(kt, vt, qt.shape[1], 1)
        Sq, Sk = qt.shape[2], kt.shape[2]
        allowed = None
        if causal:
            pos_q = torch.arange(Sq, device=q.device)[:, None]
            pos_k = torch.arange(Sk, device=q.device)[None, :]
            allowed = bottom_right_causal(Sq, Sk, pos_q, pos_k)
        out, lse = attention_core(qt, kt, vt, scale, allowed, upcast=upcast)
        out = out.transpose(1, 2)
    else:
        # packed (total, H, D) -> (H, total, D); a block-diagonal mask keeps sequences apart
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        kt, vt = _expand_kv_heads(kt, vt, qt.shape[0], 0)
        cq = cu_seqlens_q.to(device=q.device, dtype=torch.int64)
        ck = cu_seqlens_k.to(device=q.device, dtype=torch.int64)
        rows_q = torch.arange(q.shape[0], device=q.device)
        rows_k = torch.arange(k.shape[0], device=q.device)
        # sequence of each packed row (rows past cu_seqlens[-1], if any, belong to no sequence)
        seq_q = torch.searchsorted(cq, rows_q, right=True) - 1
        seq_k = torch.searchsorted(ck, rows_k, right=True) - 1
        nseq = cq.shape[0] - 1
        allowed = (seq_q[:, None] == seq_k[None, :]) & (seq_q[:, None] < nseq) & (seq_q[:, None] >= 0)
        if causal:
            sq = seq_q.clamp(0, nseq - 1)
            sk = seq_k.clamp(0, nseq - 1)
            len_q = (cq[1:] - cq[:-1])[sq]
            len_k = (ck[1:] - ck[:-1])[sq]
            pos_q = rows_q - cq[sq]
            pos_k = rows_k - ck[sk]
            allowed = allowed & bottom_right_causal(len_q[:, None], len_k[:, None], pos_q[:, None], pos_k[None, :])
        out, lse = attention_core(qt, kt, vt, scale, allowed, upcast=upcast)
        out = out.transpose(0, 1)
    return (out, lse) if return_lse else out


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    upcast: bool = True,
) -> Tensor:
    """Attention of new queries over a key/value cache (decoding, chunked prefill).

    q (B, Sq, Hq, D); k_cache, v_cache (B, Smax, Hkv, D); cache_seqlens (B,) integer. Row b
    attends the first ``L_b = cache_seqlens[b]`` cache entries (the new tokens' keys are already
    among them); with ``causal`` (the default), query i attends keys j <= i + L_b - Sq
    (bottom-right within the prefix: the last query sees all L_b keys). Slots ``j >= L_b`` are
    never read, whatever they hold (NaN included), and get zero gradient. Returns (B, Sq, Hq, D).
    """
    scale = _default_scale(softmax_scale, q.shape[-1])
    Sq, Smax = q.shape[1], k_cache.shape[1]
    lens = cache_seqlens.to(device=q.device, dtype=torch.int64).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    # Slots past the prefix are not read: zeroed, so garbage there (NaN, inf) cannot reach the
    # output through 0 * NaN, as it cannot in a kernel that never loads them.
    in_prefix = torch.arange(Smax, device=q.device).reshape(1, Smax, 1, 1) < lens
    k_cache = torch.where(in_prefix, k_cache, torch.zeros((), dtype=k_cache.dtype, device=q.device))
    v_cache = torch.where(in_prefix, v_cache, torch.zeros((), dtype=v_cache.dtype, device=q.device))
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    kt, vt = _expand_kv_heads(kt, vt, qt.shape[1], 1)
    pos_q = torch.arange(Sq, device=q.device).reshape(1, 1, Sq, 1)
    pos_k = torch.arange(Smax, device=q.device).reshape(1, 1, 1, Smax)
    allowed = pos_k < lens
    if causal:
        allowed = allowed & bottom_right_causal(Sq, lens, pos_q, pos_k)
    out, _ = attention_core(qt, kt, vt, scale, allowed, upcast=upcast)
    return out.transpose(1, 2)
