"""Attention ops: scaled_dot_product_attention, flash_attention, attention_with_kvcache.

Only the reference backend exists so far: lmkern.reference.attention (the specification),
registered directly as plain differentiable PyTorch, as the norm family's reference is, so
autograd and torch.compile trace straight through it. (Sampling wraps its reference in opaque
custom ops for reasons specific to its integer seeds; nothing like that applies here.) The cuda,
triton and cpu backends are registered with a "not implemented yet" reason, so `lmkern info` and
BackendError messages say why they decline.

The call contract each backend implements (lmkern.functional validates and normalizes the
user's arguments first; scales arrive resolved to a float):

* ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> out``
  torch layout (..., H, S, D); attn_mask None, bool or floating, broadcastable to (..., Hq, L, S).
* ``flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
  softmax_scale) -> (out, lse)``: flash-attn layout (B, S, H, D), or packed (total, H, D) with
  int32 cu_seqlens; lse float32 (B, Hq, Sq) or (Hq, total_q), always computed.
* ``attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale) -> out``
  q (B, Sq, Hq, D), caches (B, Smax, Hkv, D), cache_seqlens int32 (B,).

Dispatch specs carry ``extra = {"head_dim": D, "head_dim_v": Dv, "gqa": Hq != Hkv, ...}`` so that
kernels can decline head dimensions or features they do not cover, with a reason.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lmkern import dispatch
from lmkern.reference import attention as reference

OPS = ("scaled_dot_product_attention", "flash_attention", "attention_with_kvcache")

NOT_IMPLEMENTED = "not implemented yet: attention kernels are to come; the reference backend runs this op"


def attention_spec(q: Tensor, k: Tensor, v: Tensor, **extra) -> dispatch.InputSpec:
    info = {"head_dim": q.shape[-1], "head_dim_v": v.shape[-1]}
    info.update(extra)
    return dispatch.InputSpec(q.device.type, q.dtype, info)


# ----------------------------------------------------------------------------- reference backend


def reference_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
) -> Tensor:
    return reference.sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def reference_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    return reference.flash_attention(
        q, k, v, causal, softmax_scale, True, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )


def reference_attention_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, softmax_scale: float
) -> Tensor:
    return reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale)


# ----------------------------------------------------------------------------- dispatch


def _not_implemented(spec: dispatch.InputSpec) -> Optional[str]:
    return NOT_IMPLEMENTED


def _reference_support(spec: dispatch.InputSpec) -> Optional[str]:
    return None if spec.dtype.is_floating_point else f"q must be floating point, got {spec.dtype}"


for _name, _ref in zip(OPS, (reference_sdpa, reference_flash_attention, reference_attention_with_kvcache)):
    for _backend in ("cuda", "triton", "cpu"):
        dispatch.register(_name, _backend, _not_implemented, None)
    dispatch.register(_name, "reference", _reference_support, _ref)
