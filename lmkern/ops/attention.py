"""Attention ops: scaled_dot_product_attention, flash_attention, attention_with_kvcache.

Every kernel backend implements these kernel-level ops, and this module maps the three public
functions onto them (lmkern.functional validates and normalizes the user's arguments first;
scales arrive resolved to a float):

* ``attention_fwd(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
  max_seqlen_k, causal, causal_top_left, scale) -> (out, lse, stats)``, the contract documented beside
  its schema in csrc/registration.cpp: flash-attn's (B, S, H, D) layout with any strides (unit
  stride in the last dim), or packed (total, H, D) with int32 cu_seqlens; an optional fp32
  additive ``bias`` viewed as (B, Hq, Sq, Sk) (broadcast strides allowed); ``seqused_k`` per-row
  key counts (KV caches); causal aligned to the bottom right, or the top left (torch's sdpa).
  fp32 lse, -inf on rows that see no key (whose output is zeros); fp32 stats, each row's max
  score and log of its sum of exp(score - max) in the kernel's own units, for its backward.
* ``attention_bwd(grad_out, grad_lse, q, k, v, out, stats, <attention_fwd's arguments>) -> (dq,
  dk, dv)``: the gradients, recomputing the probabilities from the saved stats (never an (Sq, Sk)
  matrix); ``grad_lse`` (optional) is the gradient flowing into the returned lse.
* ``attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, num_splits) -> (out,
  lse)``: split-KV decoding over a cache (few queries, long cache); inference only.

Per backend:

* cpu, cuda: ``lmkern::attention_fwd`` / ``lmkern::attention_bwd`` / ``lmkern::attention_decode``
  (schemas in csrc/registration.cpp, kernels registered per dispatch key by lmkern._C:
  csrc/cpu has fwd and bwd, csrc/cuda fwd and decode). The schema alone does not make a
  backend: each says "not built" unless lmkern._C holds a kernel for its dispatch key.
* triton: ``lmkern::attention_{fwd,bwd,decode}_triton``, defined here around the launchers in
  lmkern.kernels.attention.
* reference: lmkern.reference.attention, plain differentiable PyTorch (the specification).

Backward (registered on each forward op): cpu runs its ``attention_bwd`` kernel, grad_lse
included; triton its own kernel, except that a gradient flowing into the returned lse
(flash_attention(return_lse=True)) takes the blockwise path; cuda, which has no backward kernel
yet, and any lmkern._C without one, use ``lmkern::attention_bwd_blockwise``: PyTorch
recomputing the probabilities (the softmax of whole rows) one block of query rows at a time, so
no (Sq, Sk) matrix is ever held either. The bias (an attention mask) gets no gradient: kernels
decline masks that require one.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from lmkern import _ext, dispatch
from lmkern.ops._fastpath import below_autograd, first_order_only
from lmkern.ops._layout import contiguous_or_none, unit_stride_last
from lmkern.ops._triton import define_triton_op
from lmkern.reference import attention as reference

OPS = ("scaled_dot_product_attention", "flash_attention", "attention_with_kvcache")
KERNEL_DTYPES = dispatch.LOW_PRECISION_KERNEL_DTYPES
# Head dims the Triton kernels cover (padded to a power of two inside).
TRITON_MAX_HEAD_DIM = 256
# The decode kernel puts a GQA group's queries (Hq / Hkv heads x Sq rows) in one tile; longer
# query chunks go through the forward kernel with per-row key counts instead.
DECODE_MAX_ROWS = 128


# ----------------------------------------------------------------------------- shared helpers


def _lse_shape(q: Tensor, packed: bool) -> tuple[int, ...]:
    """(B, Hq, Sq), or (Hq, total_q) when packed."""
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def _fwd_outputs(q: Tensor, packed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, stats) as every forward op allocates them, contiguous: out like q, lse fp32 of
    _lse_shape, stats fp32 (2,) + that shape."""
    shape = _lse_shape(q, packed)
    return (q.new_empty(q.shape), q.new_empty(shape, dtype=torch.float32),
            q.new_empty((2,) + shape, dtype=torch.float32))


def _decode_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) as the decode ops allocate them (inference only: no stats)."""
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, False), dtype=torch.float32)


def _fwd_fake(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal, causal_top_left, scale):
    return _fwd_outputs(q, cu_seqlens_q is not None)


def _decode_fake(q, k_cache, v_cache, cache_seqlens, causal, scale, num_splits):
    return _decode_outputs(q)


def _grad_outputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) as every backward op allocates them: contiguous, like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _bwd_fake(grad_out, q, k, v, out, stats, bias, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal, causal_top_left, scale):
    return _grad_outputs(q, k, v)


def _cpp_bwd_fake(grad_out, grad_lse, q, k, v, out, stats, bias, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal, causal_top_left, scale):
    return _grad_outputs(q, k, v)


# ----------------------------------------------------------------------------- blockwise backward

# Elements of one block of scores (query rows x keys x heads) the blockwise backward holds at once.
BLOCKWISE_SCORE_BUDGET = 1 << 22


def _sequence_backward(grad_out, grad_lse, q, k, v, out, bias, causal_offset, scale):
    """Gradients of one sequence, in fp32. q/out/grad_out (Sq, Hq, D), k/v (Sk, Hkv, D) with only
    the keys the sequence reads, grad_lse (Hq, Sq), bias (Hq, Sq, Sk) or None;
    ``causal_offset`` None (not causal) or the d in "key j visible to query i iff j <= i + d".

    With P = softmax(s) row by row: dV = P^T dO, dP = dO V^T, dS = P * (dP - delta) with
    delta_i = rowsum(dO_i * O_i) - dlse_i, dQ = scale dS K, dK = scale dS^T Q; the GQA group's
    query heads are summed into their key/value head."""
    Sq, Hq, D = q.shape
    Sk, Hkv, Dv = v.shape
    G = Hq // Hkv
    f32 = torch.float32
    qf = q.to(f32).permute(1, 0, 2).reshape(Hkv, G, Sq, D)
    kf = k.to(f32).permute(1, 0, 2)
    vf = v.to(f32).permute(1, 0, 2)
    dof = grad_out.to(f32).permute(1, 0, 2).reshape(Hkv, G, Sq, Dv)
    delta = (dof * out.to(f32).permute(1, 0, 2).reshape(Hkv, G, Sq, Dv)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(f32).reshape(Hkv, G, Sq)
    dq = torch.zeros((Hkv, G, Sq, D), dtype=f32, device=q.device)
    dk = torch.zeros((Hkv, Sk, D), dtype=f32, device=q.device)
    dv = torch.zeros((Hkv, Sk, Dv), dtype=f32, device=q.device)
    if Sq == 0 or Sk == 0:
        return dq, dk, dv
    rows = max(1, min(Sq, BLOCKWISE_SCORE_BUDGET // (Hq * Sk)))
    key_pos = torch.arange(Sk, device=q.device)
    for i0 in range(0, Sq, rows):
        i1 = min(Sq, i0 + rows)
        # causal: the block's last row sees keys up to i1 - 1 + offset; the rest is never scored
        n = Sk if causal_offset is None else max(0, min(Sk, i1 + causal_offset))
        if n == 0:
            continue
        q_blk, do_blk, k_blk, v_blk = qf[:, :, i0:i1], dof[:, :, i0:i1], kf[:, :n], vf[:, :n]
        s = torch.einsum("hgid,hjd->hgij", q_blk, k_blk) * scale
        if bias is not None:
            s = s + bias[:, i0:i1, :n].to(f32).reshape(Hkv, G, i1 - i0, n)
        if causal_offset is not None:
            query_pos = torch.arange(i0, i1, device=q.device)
            s = s.masked_fill(key_pos[None, :n] > query_pos[:, None] + causal_offset, float("-inf"))
        # The block holds whole rows, so P is their softmax, not exp(s - lse): at scores near
        # float32's min (Hugging Face's masks) the lse has lost log(row sum). A row that sees no
        # key (max -inf) has P 0; a NaN score stays NaN.
        m = s.amax(-1, keepdim=True)
        live = m != float("-inf")
        p = torch.exp(s - torch.where(live, m, torch.zeros_like(m)))
        p = p / torch.where(live, p.sum(-1, keepdim=True), torch.ones_like(m))
        dv[:, :n] += torch.einsum("hgij,hgid->hjd", p, do_blk)
        ds = p * (torch.einsum("hgid,hjd->hgij", do_blk, v_blk) - delta[:, :, i0:i1, None])
        dq[:, :, i0:i1] = torch.einsum("hgij,hjd->hgid", ds, k_blk) * scale
        dk[:, :n] += torch.einsum("hgij,hgid->hjd", ds, q_blk) * scale
    return dq, dk, dv


@torch.library.custom_op("lmkern::attention_bwd_blockwise", mutates_args=())
def attention_bwd_blockwise(
    grad_out: Optional[Tensor],
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    bias: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    causal: bool,
    causal_top_left: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of attention_fwd, on any device, in PyTorch one block of query rows at a
    time (see _sequence_backward). Reads cu_seqlens / seqused_k on the host."""
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    packed = cu_seqlens_q is not None
    if packed:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        spans = [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]
    else:
        Sk = k.shape[1]
        used = seqused_k.tolist() if seqused_k is not None else [Sk] * q.shape[0]
        spans = [(b, min(max(used[b], 0), Sk)) for b in range(q.shape[0])]
    for b, (rows_q, rows_k) in enumerate(spans):
        if packed:
            qs, ks, vs, os_, gs = q[rows_q], k[rows_k], v[rows_k], out[rows_q], grad_out[rows_q]
            gl = grad_lse[:, rows_q] if grad_lse is not None else None
            bs = None
        else:
            qs, ks, vs, os_, gs = q[rows_q], k[rows_q, :rows_k], v[rows_q, :rows_k], out[rows_q], grad_out[rows_q]
            gl = grad_lse[rows_q] if grad_lse is not None else None
            bs = bias[rows_q, :, :, :rows_k] if bias is not None else None
        Sq_b, Sk_b = qs.shape[0], ks.shape[0]
        if Sq_b == 0 or Sk_b == 0:
            continue  # no score: every gradient of this sequence is zero
        offset = None if not causal else (0 if causal_top_left else Sk_b - Sq_b)
        gq, gk, gv = _sequence_backward(gs, gl, qs, ks, vs, os_, bs, offset, scale)
        # (Hkv, G, Sq, D) -> (Sq, Hq, D); (Hkv, Sk, D) -> (Sk, Hkv, D)
        gq = gq.reshape(-1, Sq_b, gq.shape[-1]).permute(1, 0, 2)
        if packed:
            dq[rows_q], dk[rows_k], dv[rows_k] = gq, gk.permute(1, 0, 2), gv.permute(1, 0, 2)
        else:
            dq[rows_q] = gq
            dk[rows_q, :rows_k] = gk.permute(1, 0, 2)
            dv[rows_q, :rows_k] = gv.permute(1, 0, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@attention_bwd_blockwise.register_fake
def _attention_bwd_blockwise_fake(grad_out, grad_lse, q, k, v, out, bias, cu_seqlens_q, cu_seqlens_k, seqused_k, causal, causal_top_left, scale):
    return _grad_outputs(q, k, v)


# ----------------------------------------------------------------------------- C++ ops (cpu, cuda)

_HAS_SCHEMAS = _ext.HAS_CPP and all(hasattr(torch.ops.lmkern, n) for n in ("attention_fwd", "attention_decode"))
# A lmkern._C built before the C++ backward existed has no attention_bwd schema.
_HAS_BWD_SCHEMA = _ext.HAS_CPP and hasattr(torch.ops.lmkern, "attention_bwd")

if _HAS_SCHEMAS:
    torch.library.register_fake("lmkern::attention_fwd", _fwd_fake)
    torch.library.register_fake("lmkern::attention_decode", _decode_fake)
if _HAS_BWD_SCHEMA:
    torch.library.register_fake("lmkern::attention_bwd", _cpp_bwd_fake)


def _has_kernel(op: str, key: str) -> bool:
    return (
        _ext.HAS_CPP
        and hasattr(torch.ops.lmkern, op)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"lmkern::{op}", key)
    )


# Which compiled kernels lmkern._C registered (schemas exist in every build, kernels only where
# their sources were compiled in).
CPP_KERNELS: dict[tuple[str, str], bool] = {
    (op, key): _has_kernel(op, key)
    for op in ("attention_fwd", "attention_bwd", "attention_decode")
    for key in ("CPU", "CUDA")
}


# ----------------------------------------------------------------------------- Triton ops

TRITON_ATTENTION_ERROR: Optional[str] = None  # why the Triton attention ops are missing, if they are
triton_attention = None
if _ext.HAS_TRITON:
    try:
        triton_attention = importlib.import_module("lmkern.kernels.attention")
        _missing = [n for n in ("attention_fwd", "attention_bwd") if not callable(getattr(triton_attention, n, None))]
        if _missing:
            triton_attention = None
            TRITON_ATTENTION_ERROR = f"lmkern.kernels.attention has no {' / '.join(_missing)} launcher: not implemented"
    except ImportError as e:
        TRITON_ATTENTION_ERROR = f"Triton attention kernels are not implemented in this installation ({e})"
    except Exception as e:  # a broken kernel module removes this backend only
        TRITON_ATTENTION_ERROR = f"lmkern.kernels.attention failed to import ({type(e).__name__}: {e})"
else:
    TRITON_ATTENTION_ERROR = _ext.TRITON_ERROR

HAS_TRITON_DECODE = triton_attention is not None and callable(getattr(triton_attention, "attention_decode", None))

if triton_attention is not None:

    @define_triton_op("lmkern::attention_fwd_triton", _fwd_fake)
    def attention_fwd_triton(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Optional[Tensor],
        cu_seqlens_q: Optional[Tensor],
        cu_seqlens_k: Optional[Tensor],
        seqused_k: Optional[Tensor],
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool,
        causal_top_left: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        out, lse, stats = _fwd_outputs(q, cu_seqlens_q is not None)
        if q.numel() == 0:
            return out, lse, stats
        triton_attention.attention_fwd(
            unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), bias, contiguous_or_none(cu_seqlens_q),
            contiguous_or_none(cu_seqlens_k), contiguous_or_none(seqused_k), max_seqlen_q, max_seqlen_k, causal,
            causal_top_left, scale, out, lse, stats,
        )
        return out, lse, stats

    @define_triton_op("lmkern::attention_bwd_triton", _bwd_fake)
    def attention_bwd_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        stats: Tensor,
        bias: Optional[Tensor],
        cu_seqlens_q: Optional[Tensor],
        cu_seqlens_k: Optional[Tensor],
        seqused_k: Optional[Tensor],
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool,
        causal_top_left: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        triton_attention.attention_bwd(
            unit_stride_last(grad_out), unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), out, stats, bias,
            contiguous_or_none(cu_seqlens_q), contiguous_or_none(cu_seqlens_k), contiguous_or_none(seqused_k),
            max_seqlen_q, max_seqlen_k, causal, causal_top_left, scale, dq, dk, dv,
        )
        return dq, dk, dv

if HAS_TRITON_DECODE:

    @define_triton_op("lmkern::attention_decode_triton", _decode_fake)
    def attention_decode_triton(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, causal: bool, scale: float, num_splits: int
    ) -> tuple[Tensor, Tensor]:
        out, lse = _decode_outputs(q)
        if q.numel() == 0:
            return out, lse
        triton_attention.attention_decode(
            unit_stride_last(q), unit_stride_last(k_cache), unit_stride_last(v_cache), cache_seqlens.contiguous(), causal,
            scale, num_splits, out, lse,
        )
        return out, lse


# ----------------------------------------------------------------------------- autograd


def _blockwise_backward(grad_out, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale):
    return torch.ops.lmkern.attention_bwd_blockwise(
        grad_out, grad_lse, q, k, v, out, bias, cu_q, cu_k, seqused_k, causal, top_left, scale
    )


def _cpp_backward(grad_out, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale):
    """Backward of the C++ forward: lmkern::attention_bwd where lmkern._C has a kernel for the
    tensors' device (CPU), else the blockwise PyTorch backward (CUDA, for now)."""
    if not CPP_KERNELS.get(("attention_bwd", q.device.type.upper()), False):
        return _blockwise_backward(grad_out, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale)
    if grad_out is None:  # only the lse is used
        grad_out = torch.zeros_like(out)
    return torch.ops.lmkern.attention_bwd(
        unit_stride_last(grad_out), grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale
    )


def _triton_backward(grad_out, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale):
    """The Triton backward kernel; the blockwise one when the lse receives a gradient."""
    if grad_lse is not None or grad_out is None:
        return _blockwise_backward(grad_out, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale)
    return torch.ops.lmkern.attention_bwd_triton(
        grad_out, q, k, v, out, stats, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale
    )


def _register_autograd(fwd: str, backward) -> None:
    """Autograd of the forward op ``fwd``: ``backward(grad_out, grad_lse, q, k, v, out, stats, bias,
    cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal, causal_top_left,
    scale) -> (dq, dk, dv)``, where grad_out or grad_lse (not both) may be None."""

    def setup_context(ctx, inputs, output):
        q, k, v, bias, cu_q, cu_k, seqused_k, max_q, max_k, causal, top_left, scale = inputs
        out, _, stats = output
        ctx.set_materialize_grads(False)  # an unused lse brings None, not a tensor of zeros
        ctx.args = (max_q, max_k, causal, top_left, scale)
        ctx.save_for_backward(q, k, v, out, stats, bias, cu_q, cu_k, seqused_k)

    def _backward(ctx, grad_out, grad_lse, _grad_stats):
        if grad_out is None and grad_lse is None:
            return (None,) * 12
        dq, dk, dv = backward(grad_out, grad_lse, *ctx.saved_tensors, *ctx.args)
        return (dq, dk, dv) + (None,) * 9

    torch.library.register_autograd(f"lmkern::{fwd}", _backward, setup_context=setup_context)


if _HAS_SCHEMAS:
    _register_autograd("attention_fwd", _cpp_backward)
if _HAS_BWD_SCHEMA:
    first_order_only("lmkern::attention_bwd")
if triton_attention is not None:
    _register_autograd("attention_fwd_triton", _triton_backward)


# ----------------------------------------------------------------------------- backends


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class KernelBackend:
    """The three public functions of one kernel backend, on its ``attention_fwd`` op (and its
    ``attention_decode`` op for cache decoding, when it has one)."""

    def __init__(self, fwd, decode=None):
        self._fwd, self._decode = fwd, decode

    def fwd(self, q, k, v, *args):
        """(out, lse) of the backend's forward op (its stats are for its backward only)."""
        out, lse, _ = self._fwd(unit_stride_last(q), unit_stride_last(k), unit_stride_last(v), *args)
        return out, lse

    def decode(self, q, k_cache, v_cache, *args):
        return self._decode(unit_stride_last(q), unit_stride_last(k_cache), unit_stride_last(v_cache), *args)

    def sdpa(self, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        # (..., H, S, D) -> (B, S, H, D) views: the kernels take any strides, so no copy when
        # the leading dims flatten into one.
        lead, (Hq, L, D), (Hkv, S), Dv = q.shape[:-3], q.shape[-3:], k.shape[-3:-1], v.shape[-1]
        four_d = q.dim() == 4 and k.dim() == 4 and v.dim() == 4  # the common case: no reshape (~2 µs each)
        B = math.prod(lead)  # (not -1: a reshape cannot infer it when a sequence length is 0)
        q4 = (q if four_d else q.reshape(B, Hq, L, D)).transpose(1, 2)
        k4 = (k if four_d else k.reshape(B, Hkv, S, D)).transpose(1, 2)
        v4 = (v if four_d else v.reshape(B, Hkv, S, Dv)).transpose(1, 2)
        bias = None
        if attn_mask is not None:
            # fp32 additive bias built at the mask's own (unbroadcast) size, then viewed as
            # (B, Hq, L, S) with zero strides where the mask broadcasts
            if attn_mask.dtype == torch.bool:
                bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=q.device).masked_fill_(~attn_mask, float("-inf"))
            else:
                bias = attn_mask.to(torch.float32)
            bias = bias.expand(lead + (Hq, L, S)).reshape(B, Hq, L, S)
        out, _ = self.fwd(q4, k4, v4, bias, None, None, None, L, S, is_causal, True, scale)
        return out.transpose(1, 2) if four_d else out.transpose(1, 2).reshape(lead + (Hq, L, Dv))

    def flash_attention(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
        if cu_seqlens_q is None:
            return self.fwd(q, k, v, None, None, None, None, q.shape[1], k.shape[1], causal, False, softmax_scale)
        # without the hints, the packed totals bound every sequence (no host read)
        max_q = max_seqlen_q if max_seqlen_q is not None else q.shape[0]
        max_k = max_seqlen_k if max_seqlen_k is not None else k.shape[0]
        return self.fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, None, max_q, max_k, causal, False, softmax_scale)

    def attention_with_kvcache(self, q, k_cache, v_cache, cache_seqlens, causal, softmax_scale, num_splits):
        B, Sq, Hq, _ = q.shape
        rows = Sq * (Hq // k_cache.shape[2])
        if self._decode is not None and rows <= DECODE_MAX_ROWS and not _needs_grad(q, k_cache, v_cache):
            out, _ = self.decode(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale, num_splits)
            return out
        out, _ = self.fwd(q, k_cache, v_cache, None, None, None, cache_seqlens, Sq, k_cache.shape[1], causal, False, softmax_scale)
        return out


def reference_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return reference.sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def reference_flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return reference.flash_attention(
        q, k, v, causal, softmax_scale, True, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )


def reference_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale, num_splits):
    return reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal, softmax_scale)


# ----------------------------------------------------------------------------- dispatch


def attention_spec(q: Tensor, k: Tensor, v: Tensor, **extra) -> dispatch.InputSpec:
    """Dispatch spec: ``head_dim``, ``head_dim_v`` and whatever the public function adds
    (gqa, mask dtype, mask_grad, dropout, varlen, causal)."""
    info = {"head_dim": q.shape[-1], "head_dim_v": v.shape[-1]}
    info.update(extra)
    return dispatch.InputSpec(dispatch.device_type(q), q.dtype, info)


def _kernel_support(spec: dispatch.InputSpec) -> Optional[str]:
    """What every attention kernel backend declines (the reference runs these)."""
    if spec.dtype not in KERNEL_DTYPES:
        return f"{spec.dtype} inputs run on the reference backend (kernels take float32, float16, bfloat16)"
    if spec.extra.get("head_dim") != spec.extra.get("head_dim_v"):
        return "value's head dim differs from query's; the kernels need them equal"
    if spec.extra.get("dropout"):
        return "dropout_p > 0: the kernels have no dropout (the reference backend does it)"
    if spec.extra.get("mask_grad"):
        return "attn_mask requires grad: the kernels give masks no gradient (the reference does)"
    return None


# The C++ CPU kernel keeps a few head vectors per thread in fixed scratch (csrc/cpu/attention_cpu.cpp).
CPU_MAX_HEAD_DIM = 4096


def _cpu_support(spec: dispatch.InputSpec) -> Optional[str]:
    if not CPP_KERNELS[("attention_fwd", "CPU")]:
        return "not built: lmkern._C has no CPU kernel for lmkern::attention_fwd (rebuild with `pip install --no-build-isolation .`)"
    if spec.extra.get("head_dim", 0) > CPU_MAX_HEAD_DIM:
        return f"head dim {spec.extra['head_dim']} > {CPU_MAX_HEAD_DIM}, the largest the CPU kernel's scratch holds"
    return _kernel_support(spec)


# What the CUDA prefill kernel is instantiated for (csrc/include/lmkern/attention_cuda.h); the
# decode kernel covers more (float32, any multiple of 8), but a call may route either way.
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128, 160, 192, 256)


def _cuda_support(spec: dispatch.InputSpec) -> Optional[str]:
    if not CPP_KERNELS[("attention_fwd", "CUDA")]:
        return "not built: lmkern._C has no CUDA kernel for lmkern::attention_fwd"
    if spec.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernels run float16 and bfloat16 on tensor cores; {spec.dtype} runs on triton or the reference"
    if spec.extra.get("head_dim") not in CUDA_HEAD_DIMS:
        return f"head dim {spec.extra.get('head_dim')} is not one the CUDA kernel is built for {CUDA_HEAD_DIMS}"
    return _kernel_support(spec)


def _triton_support(spec: dispatch.InputSpec) -> Optional[str]:
    if triton_attention is None:
        return TRITON_ATTENTION_ERROR or "Triton attention kernels are not implemented"
    if spec.device_type == "cpu" and spec.dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 incorrectly; bfloat16 Triton runs on CUDA only"
    if spec.extra.get("head_dim", 0) > TRITON_MAX_HEAD_DIM:
        return f"head dim {spec.extra['head_dim']} > {TRITON_MAX_HEAD_DIM}, the largest the Triton kernels tile"
    return _kernel_support(spec)


def _reference_support(spec: dispatch.InputSpec) -> Optional[str]:
    return None if spec.dtype.is_floating_point else f"q must be floating point, got {spec.dtype}"


def _op(name: str):
    return getattr(torch.ops.lmkern, name) if hasattr(torch.ops.lmkern, name) else None


def _backend(fwd: Optional[str], decode: Optional[str]) -> Optional[KernelBackend]:
    if not fwd or _op(fwd) is None:
        return None
    return KernelBackend(below_autograd(_op(fwd)), below_autograd(_op(decode)) if decode else None)


_METHODS = {"scaled_dot_product_attention": "sdpa", "flash_attention": "flash_attention", "attention_with_kvcache": "attention_with_kvcache"}
_KERNEL_BACKENDS = {
    "cpu": (_cpu_support, _backend("attention_fwd", None) if CPP_KERNELS[("attention_fwd", "CPU")] else None),
    "cuda": (
        _cuda_support,
        _backend("attention_fwd", "attention_decode" if CPP_KERNELS[("attention_decode", "CUDA")] else None)
        if CPP_KERNELS[("attention_fwd", "CUDA")]
        else None,
    ),
    "triton": (
        _triton_support,
        _backend("attention_fwd_triton", "attention_decode_triton" if HAS_TRITON_DECODE else None)
        if triton_attention is not None
        else None,
    ),
}
for _backend_name, (_supports, _impl) in _KERNEL_BACKENDS.items():
    for _name in OPS:
        dispatch.register(_name, _backend_name, _supports, getattr(_impl, _METHODS[_name]) if _impl else None)
for _name, _ref in zip(OPS, (reference_sdpa, reference_flash_attention, reference_attention_with_kvcache)):
    dispatch.register(_name, "reference", _reference_support, _ref)
