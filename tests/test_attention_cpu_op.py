"""The C++ CPU kernels of lmkern::attention_fwd and lmkern::attention_bwd, called directly
(torch.ops.lmkern.attention_fwd / attention_bwd).

Each test draws fresh random inputs (seeded per run, see conftest.py) and compares out and lse, or
dq, dk and dv, with lmkern.reference.attention run in float64 (gradients: torch.autograd through
it), using the 2x rule of helpers.assert_close_2x against the same reference run in the input's
precision.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from attention_helpers import check_row_stats, grad_term_scale
from helpers import assert_close_2x, poisoned_empty

import lmkern  # noqa: F401  (registers the ops)
from lmkern import _ext
from lmkern.reference.attention import attention_core, flash_attention

pytestmark = pytest.mark.skipif(
    not (_ext.HAS_CPP and hasattr(torch.ops.lmkern, "attention_fwd")), reason="lmkern._C not built"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = float("inf")


def op(q, k, v, bias=None, cu_q=None, cu_k=None, used=None, causal=False, top_left=False, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with poisoned_empty():  # an output element the kernel forgot to write shows up as NaN
        return torch.ops.lmkern.attention_fwd(q, k, v, bias, cu_q, cu_k, used, 0, 0, causal, top_left, scale)


def dense_reference(q, k, v, bias=None, used=None, causal=False, top_left=False, scale=None, lowp=False):
    """attention_fwd's contract on dense (B, S, H, D) inputs: float64 (or, with lowp, torch computing
    in the inputs' own dtype). Keys at or past seqused_k are masked and zeroed (never read)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ct = q.dtype if lowp else torch.float64
    qt = q.transpose(1, 2).to(ct)
    kt = k.transpose(1, 2).to(ct).repeat_interleave(Hq // Hkv, dim=1)
    vt = v.transpose(1, 2).to(ct).repeat_interleave(Hq // Hkv, dim=1)
    lens = torch.full((B,), Sk) if used is None else used.long()
    lens = lens.reshape(B, 1, 1, 1)
    pos_q = torch.arange(Sq).reshape(1, 1, Sq, 1)
    pos_k = torch.arange(Sk).reshape(1, 1, 1, Sk)
    allowed = pos_k < lens
    kt = torch.where(allowed.transpose(-1, -2), kt, 0)
    vt = torch.where(allowed.transpose(-1, -2), vt, 0)
    if causal:
        allowed = allowed & (pos_k <= pos_q + (0 if top_left else lens - Sq))
    out, lse = attention_core(qt, kt, vt, scale, allowed, bias, upcast=not lowp)
    return out.transpose(1, 2), lse.float()


def check(out, lse, ref, ref_lp, ref_lse32, what):
    """out within the 2x rule of the reference; lse -inf exactly where the reference's is, and
    within the 2x rule (float32 statistics) elsewhere."""
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32, what
    ref_out, ref_lse = ref
    assert_close_2x(out, ref_out, ref_lp[0], f"{what} out")
    masked = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), masked), f"{what}: lse -inf rows differ"
    assert_close_2x(lse[~masked], ref_lse[~masked].double(), ref_lse32[~masked], f"{what} lse", term_scale=1.0)


def run_dense(q, k, v, what, bias=None, used=None, causal=False, top_left=False, scale=None):
    out, lse, stats = op(q, k, v, bias, None, None, used, causal, top_left, scale)
    check_row_stats(lse, stats, keys=k.shape[1], what=what)
    kw = dict(bias=bias, used=used, causal=causal, top_left=top_left, scale=scale)
    ref = dense_reference(q, k, v, **kw)
    ref_lp = dense_reference(q, k, v, lowp=True, **kw)
    ref32 = dense_reference(q.float(), k.float(), v.float(), lowp=True, **kw)
    check(out, lse, ref, ref_lp, ref32[1], what)
    return out, lse


def bhsd(B, S, H, D, dtype):
    """(B, S, H, D) view of a (B, H, S, D) tensor: the strided layout sdpa callers pass."""
    return torch.randn(B, H, S, D, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 32, 64, 80, 96, 128, 256])
def test_head_dims(dtype, D):
    q, k, v = bhsd(2, 37, 4, D, dtype), bhsd(2, 53, 2, D, dtype), bhsd(2, 53, 2, D, dtype)
    run_dense(q, k, v, f"D={D}", causal=True)


# (B, Sq, Sk, Hq, Hkv, causal, top_left)
SHAPES = [
    (2, 97, 97, 4, 4, False, False),
    (1, 97, 97, 4, 4, True, False),
    (1, 40, 97, 2, 2, True, False),  # Sq < Sk: bottom-right sees keys ahead of the top-left mask
    (1, 40, 97, 2, 2, True, True),
    (1, 97, 40, 2, 2, True, False),  # Sq > Sk: the first 57 rows see no key
    (1, 97, 40, 2, 2, True, True),
    (2, 61, 75, 8, 2, True, False),  # GQA
    (2, 61, 75, 6, 1, False, False),  # MQA
    (1, 1, 97, 8, 2, True, False),  # one query (decode)
    (3, 1, 1, 2, 1, True, True),
    (1, 1025, 1025, 2, 1, True, False),
    (1, 200, 1025, 4, 2, False, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[:5]}-causal{s[5]}-tl{s[6]}" for s in SHAPES])
def test_shapes(dtype, shape):
    B, Sq, Sk, Hq, Hkv, causal, top_left = shape
    D = 64
    q, k, v = bhsd(B, Sq, Hq, D, dtype), bhsd(B, Sk, Hkv, D, dtype), bhsd(B, Sk, Hkv, D, dtype)
    _, lse = run_dense(q, k, v, str(shape), causal=causal, top_left=top_left)
    if causal and Sq > Sk and not top_left:
        assert torch.isneginf(lse[:, :, : Sq - Sk]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_and_custom_scale(dtype):
    q, k, v = (torch.randn(2, 50, 4, 32, dtype=dtype) for _ in range(3))
    run_dense(q, k, v, "contiguous", scale=0.37)
    # k and v as views of one fused (B, S, 2, H, D) tensor: row strides that are not H * D
    kv = torch.randn(2, 50, 2, 4, 32, dtype=dtype)
    run_dense(q, kv[:, :, 0], kv[:, :, 1], "fused kv", causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_broadcast_and_masked_rows(dtype):
    B, Sq, Sk, H = 2, 45, 70, 4
    q, k, v = bhsd(B, Sq, H, 64, dtype), bhsd(B, Sk, 2, 64, dtype), bhsd(B, Sk, 2, 64, dtype)
    # one (query, key) bias broadcast over batch and heads (strides 0, 0, Sk, 1), with -inf
    # entries and one fully masked row
    bias = torch.randn(1, 1, Sq, Sk)
    bias[bias > 1.5] = -INF
    bias[0, 0, 7] = -INF
    bias = bias.expand(B, H, Sq, Sk)
    out, lse = run_dense(q, k, v, "bias", bias=bias, causal=True, top_left=True)
    assert torch.isneginf(lse[:, :, 7]).all() and (out[:, 7] == 0).all()
    # a (1, H, 1, Sk) bias (strides 0 over batch and queries) and a transposed one
    b2 = torch.randn(1, H, 1, Sk).masked_fill(torch.rand(1, H, 1, Sk) < 0.3, -INF).expand(B, H, Sq, Sk)
    run_dense(q, k, v, "bias per key", bias=b2)
    b3 = torch.randn(B, H, Sk, Sq).transpose(-1, -2)
    run_dense(q, k, v, "transposed bias", bias=b3, causal=True)


def test_fully_masked_rows_give_zeros():
    q, k, v = bhsd(1, 9, 2, 16, torch.float32), bhsd(1, 4, 2, 16, torch.float32), bhsd(1, 4, 2, 16, torch.float32)
    out, lse, stats = op(q, k, v, causal=True)  # bottom-right, Sq > Sk: rows 0..4 see nothing
    assert (out[:, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 5:]).all()
    bias = torch.full((1, 2, 9, 4), -INF)
    out, lse, stats = op(q, k, v, bias)
    assert (out == 0).all() and torch.isneginf(lse).all()
    k0, v0 = torch.randn(1, 0, 2, 16), torch.randn(1, 0, 2, 16)  # no keys at all
    out, lse, stats = op(q, k0, v0)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_seqused_k_never_reads_past_the_prefix(dtype):
    B, Smax, Hq, Hkv, D = 4, 300, 8, 2, 64
    q = torch.randn(B, 3, Hq, D, dtype=dtype)
    k, v = torch.randn(B, Smax, Hkv, D, dtype=dtype), torch.randn(B, Smax, Hkv, D, dtype=dtype)
    used = torch.tensor([300, 1, 0, 130], dtype=torch.int32)
    for b, n in enumerate(used.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    for causal in (False, True):
        out, lse = run_dense(q, k, v, f"seqused_k causal={causal}", used=used, causal=causal)
        assert not out.isnan().any()
        assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


# Work items of a few rows (decode: Sq x G rows per kv head) run their own kernel, lanes along the
# head dim (run_item_few in csrc/cpu/attention_cpu_kernels.h): rows 1 to 8, head dims with and
# without a partial register, key counts around its blocks, causal, bias and seqused_k.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,G", [(1, 1), (1, 3), (2, 2), (1, 8), (3, 1)])
@pytest.mark.parametrize("D", [1, 20, 64, 128, 256])
def test_few_row_items(dtype, Sq, G, D):
    B, Hkv, Smax = 3, 2, 300
    q = torch.randn(B, Sq, Hkv * G, D, dtype=dtype)
    k, v = bhsd(B, Smax, Hkv, D, dtype), bhsd(B, Smax, Hkv, D, dtype)
    used = torch.tensor([300, 1, 65], dtype=torch.int32)
    run_dense(q, k, v, "few rows", used=used, causal=True)
    run_dense(q, k[:, :7], v[:, :7], "few rows, 7 keys", causal=Sq > 1, scale=0.3)
    bias = torch.randn(B, Hkv * G, Sq, Smax).masked_fill(torch.rand(B, Hkv * G, Sq, Smax) < 0.2, -INF)
    bias[1, 0, 0] = -INF  # a fully masked row
    out, lse = run_dense(q, k, v, "few rows, bias", bias=bias)
    assert (out[1, 0, 0] == 0).all() and torch.isneginf(lse[1, 0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sq,G", [(1, 1), (1, 4), (2, 2)])
@pytest.mark.parametrize("D", [20, 64, 256])
@pytest.mark.parametrize("B,Hkv", [(1, 12), (2, 5)])
def test_few_row_items_of_several_heads(dtype, Sq, G, D, B, Hkv):
    """Contiguous (B, S, H, D) caches: a head's keys lie H * D apart, so a few-row item takes
    several kv heads (12 heads in one sequence: items of 3 with two threads; 5 heads in two: 2, 2
    and 1), walked block by block."""
    Smax = 150
    q = torch.randn(B, Sq, Hkv * G, D, dtype=dtype)
    k, v = torch.randn(B, Smax, Hkv, D, dtype=dtype), torch.randn(B, Smax, Hkv, D, dtype=dtype)
    used = torch.tensor([150, 37][:B], dtype=torch.int32)
    run_dense(q, k, v, "heads side by side", used=used, causal=True)
    bias = torch.randn(B, Hkv * G, Sq, Smax).masked_fill(torch.rand(B, Hkv * G, Sq, Smax) < 0.2, -INF)
    bias[0, -1] = -INF  # the last head's rows fully masked
    out, lse = run_dense(q, k, v, "heads side by side, bias", bias=bias)
    assert (out[0, :, -1] == 0).all() and torch.isneginf(lse[0, -1]).all()
    # keys side by side, values not (one head per item again)
    run_dense(q, k, v.transpose(1, 2).contiguous().transpose(1, 2), "values head-major")


def test_few_row_items_nan():
    """A NaN query poisons its own row only; a NaN value element only its own output dim."""
    q, k, v = torch.randn(1, 1, 4, 40), torch.randn(1, 90, 2, 40), torch.randn(1, 90, 2, 40)
    q[0, 0, 1, 5] = float("nan")
    v[0, 70, 1, 33] = float("nan")
    out, lse, stats = op(q, k, v)
    assert out[0, 0, 1].isnan().all() and lse[0, 1, 0].isnan()
    assert not out[0, 0, 0].isnan().any() and torch.isfinite(lse[0, 0, 0])
    assert out[0, 0, 2:, 33].isnan().all() and not out[0, 0, 2:, :33].isnan().any()


# Packed sequences of every kind: empty on both sides, keys without queries, queries without keys,
# Sq < Sk, Sq > Sk, long, equal.
VARLEN_Q = [5, 0, 0, 3, 40, 1, 130, 7]
VARLEN_K = [5, 0, 9, 0, 17, 60, 129, 7]


def varlen_case(dtype, lens_q, lens_k, Hq, Hkv, D):
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(Hq, int(cu_q[-1]), D, dtype=dtype).transpose(0, 1)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    """Forward and backward on packed sequences of every kind."""
    q, k, v, cu_q, cu_k = varlen_case(dtype, VARLEN_Q, VARLEN_K, 6, 2, 64)
    out, lse, stats = op(q, k, v, None, cu_q, cu_k, causal=causal)
    kw = dict(causal=causal, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = flash_attention(q.double(), k.double(), v.double(), **kw)
    ref_lp = flash_attention(q, k, v, upcast=False, **kw)
    ref32 = flash_attention(q.float(), k.float(), v.float(), **kw)
    assert out.shape == q.shape and lse.shape == (6, q.shape[0])
    check(out, lse, ref, ref_lp, ref32[1], f"varlen causal={causal}")
    check_row_stats(lse, stats, keys=k.shape[0], what=f"varlen causal={causal}")
    assert (out[5:8] == 0).all()  # the sequence with 3 queries and no keys

    g, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = bwd_op(g, q, k, v, out, stats, None, cu_q, cu_k, causal=causal, grad_lse=grad_lse)

    def fn_ref(q, k, v, lowp):
        return flash_attention(q, k, v, upcast=not lowp, **kw)

    check_grads(grads, (q, k, v), fn_ref, g, grad_lse, f"varlen bwd causal={causal}")
    assert (grads[1][5:14] == 0).all() and (grads[2][5:14] == 0).all()  # 9 keys without queries


def test_empty_inputs():
    for B, Sq, Sk in [(0, 5, 5), (2, 0, 5), (2, 5, 0), (0, 0, 0)]:
        q, k, v = torch.randn(B, Sq, 4, 32), torch.randn(B, Sk, 2, 32), torch.randn(B, Sk, 2, 32)
        out, lse, stats = op(q, k, v, causal=True)
        assert out.shape == q.shape and lse.shape == (B, 4, Sq)
        assert (out == 0).all() and torch.isneginf(lse).all()
    cu = torch.zeros(1, dtype=torch.int32)  # zero sequences
    out, lse, stats = op(torch.randn(0, 4, 32), torch.randn(0, 2, 32), torch.randn(0, 2, 32), None, cu, cu)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)


def test_nan_propagates():
    q, k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 30, 2, 32), torch.randn(1, 30, 2, 32)
    q[0, 3, 1, 5] = float("nan")
    v[0, 11, 0, 2] = float("nan")
    out, lse, stats = op(q, k, v)
    assert out[0, 3, 1].isnan().all()
    assert out[0, :, 0, 2].isnan().all() and not out[0, :, 0, 3].isnan().any()
    assert not out[0, 4, 1].isnan().any()
    # a NaN score makes the lse NaN, not -inf (which would say the row saw no key), as in the
    # reference; a NaN value leaves it finite
    ref_lse = dense_reference(q, k, v)[1]
    assert lse[0, 1, 3].isnan() and ref_lse[0, 1, 3].isnan()
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(ref_lse[0, 0]).all()


def test_bad_inputs():
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    qp, kp = torch.randn(16, 4, 16), torch.randn(16, 2, 16)
    cases = [
        ("q must", lambda: op(q[0], k, v)),
        ("k must", lambda: op(q, k[0], v)),
        ("v must", lambda: op(q, k, v.half())),
        ("q must be float32", lambda: op(q.double(), k.double(), v.double())),
        ("k must have q's dtype", lambda: op(q, k.half(), v)),
        ("stride 1", lambda: op(q.transpose(-1, -2), k, v)),
        ("v must have k's shape", lambda: op(q, k, v[:, :8])),
        ("k must have q's head_dim", lambda: op(q, k[..., :8], v[..., :8])),
        ("k must have q's batch", lambda: op(q, k[:1], v[:1])),
        ("must divide", lambda: op(q, torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16))),
        ("bias must be float32", lambda: op(q, k, v, torch.zeros(2, 4, 8, 9, dtype=torch.float16))),
        ("bias must have shape", lambda: op(q, k, v, torch.zeros(2, 4, 8, 8))),
        ("bias must have shape", lambda: op(q, k, v, torch.zeros(4, 8, 9))),
        ("seqused_k must be int32", lambda: op(q, k, v, used=torch.tensor([1, 2]))),
        ("seqused_k must have shape", lambda: op(q, k, v, used=torch.tensor([1, 2, 3], dtype=torch.int32))),
        ("seqused_k values", lambda: op(q, k, v, used=torch.tensor([1, 10], dtype=torch.int32))),
        ("seqused_k values", lambda: op(q, k, v, used=torch.tensor([-1, 1], dtype=torch.int32))),
        ("given together", lambda: op(qp, kp, kp, None, cu, None)),
        ("cu_seqlens_q must be int32", lambda: op(qp, kp, kp, None, cu.long(), cu)),
        ("cu_seqlens_k must have shape", lambda: op(qp, kp, kp, None, cu, cu[:2])),
        ("cu_seqlens_q must have shape", lambda: op(qp, kp, kp, None, cu.reshape(1, 3), cu)),
        ("cu_seqlens_q must start at 0", lambda: op(qp, kp, kp, None, cu + 1, cu)),
        ("cu_seqlens_k must be non-decreasing", lambda: op(qp, kp, kp, None, cu, torch.tensor([0, 17, 16], dtype=torch.int32))),
        ("cu_seqlens_q must end", lambda: op(qp, kp, kp, None, torch.tensor([0, 8, 15], dtype=torch.int32), cu)),
        ("cu_seqlens_k must end", lambda: op(qp, kp, kp, None, cu, torch.tensor([0, 8, 99], dtype=torch.int32))),
        ("bias is only supported with dense", lambda: op(qp, kp, kp, torch.zeros(1, 4, 16, 16), cu, cu)),
        ("seqused_k is only supported with dense", lambda: op(qp, kp, kp, None, cu, cu, cu[:2])),
        ("q must be 3-D", lambda: op(q, kp, kp, None, cu, cu)),
    ]
    for match, call in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# ----------------------------------------------------------------------------- backward


def bwd_op(g, q, k, v, out, stats, bias=None, cu_q=None, cu_k=None, used=None, causal=False, top_left=False,
           scale=None, grad_lse=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with poisoned_empty():
        return torch.ops.lmkern.attention_bwd(
            g, grad_lse, q, k, v, out, stats, bias, cu_q, cu_k, used, 0, 0, causal, top_left, scale
        )


def reference_grads(fn, inputs, dtype, g, grad_lse):
    """Gradients of <out, g> + <lse, grad_lse> with respect to q, k, v through fn(q, k, v) ->
    (out, lse), computing in ``dtype``."""
    xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = fn(*xs)
    outs, grads = [out], [g.to(out.dtype)]
    if grad_lse is not None:
        outs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    got = torch.autograd.grad(outs, xs, grads, allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(xs, got)]


def check_grads(grads, inputs, fn_ref, g, grad_lse, what):
    """dq, dk, dv against fn_ref(q, k, v, lowp) by the 2x rule: float64 autograd, and the same in
    the inputs' precision for torch's own error."""
    q = inputs[0]
    exp64 = reference_grads(lambda *x: fn_ref(*x, lowp=False), inputs, torch.float64, g, grad_lse)
    explp = reference_grads(lambda *x: fn_ref(*x, lowp=True), inputs, q.dtype, g, grad_lse)
    terms = grad_term_scale(g, *inputs, grad_lse=grad_lse)
    for name, x, got, e64, elp in zip("qkv", inputs, grads, exp64, explp):
        assert got.shape == x.shape and got.dtype == q.dtype and got.is_contiguous(), f"{what} d{name}"
        assert_close_2x(got, e64, elp, f"{what} d{name}", term_scale=terms)


def run_dense_bwd(q, k, v, what, bias=None, used=None, causal=False, top_left=False, scale=None, with_dlse=False):
    """attention_fwd, then attention_bwd on a random (non-contiguous) grad_out and, with_dlse, a
    random grad_lse; gradients checked against the dense reference."""
    out, lse, stats = op(q, k, v, bias, None, None, used, causal, top_left, scale)
    g = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3]).transpose(1, 2).to(q.dtype)
    grad_lse = torch.randn_like(lse) if with_dlse else None
    grads = bwd_op(g, q, k, v, out, stats, bias, None, None, used, causal, top_left, scale, grad_lse)
    kw = dict(bias=bias, used=used, causal=causal, top_left=top_left, scale=scale)
    check_grads(grads, (q, k, v), lambda q, k, v, lowp: dense_reference(q, k, v, lowp=lowp, **kw), g, grad_lse, what)
    return grads


# (B, Sq, Sk, Hq, Hkv, causal, top_left); 70 keys cross a key block, 70 rows a row chunk
BWD_SHAPES = [
    (2, 37, 53, 4, 4, False, False),
    (1, 70, 70, 4, 2, True, False),  # GQA
    (1, 40, 97, 2, 2, True, True),  # top-left, Sq < Sk: keys past Sq get no gradient
    (1, 97, 40, 6, 1, True, False),  # MQA, Sq > Sk bottom-right: the first 57 rows see no key
    (1, 1, 97, 8, 2, True, False),  # one query
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=[f"{s[:5]}-causal{s[5]}-tl{s[6]}" for s in BWD_SHAPES])
def test_backward_shapes(dtype, shape):
    B, Sq, Sk, Hq, Hkv, causal, top_left = shape
    q, k, v = bhsd(B, Sq, Hq, 64, dtype), bhsd(B, Sk, Hkv, 64, dtype), bhsd(B, Sk, Hkv, 64, dtype)
    dq, dk, _ = run_dense_bwd(q, k, v, f"bwd {shape}", causal=causal, top_left=top_left)
    if causal and Sq > Sk and not top_left:
        assert (dq[:, : Sq - Sk] == 0).all()
    if causal and top_left and Sk > Sq:
        assert (dk[:, Sq:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [3, 80, 256])
def test_backward_head_dims(dtype, D):
    q, k, v = bhsd(1, 37, 4, D, dtype), bhsd(1, 67, 2, D, dtype), bhsd(1, 67, 2, D, dtype)
    run_dense_bwd(q, k, v, f"bwd D={D}", causal=True, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_bias_seqused_and_grad_lse(dtype):
    B, Sq, Sk, Hq, Hkv = 2, 45, 70, 4, 2
    q, k, v = bhsd(B, Sq, Hq, 64, dtype), bhsd(B, Sk, Hkv, 64, dtype), bhsd(B, Sk, Hkv, 64, dtype)
    # a (query, key) bias broadcast over batch and heads, with -inf entries and a masked row
    bias = torch.randn(1, 1, Sq, Sk)
    bias[bias > 1.5] = -INF
    bias[0, 0, 7] = -INF
    bias = bias.expand(B, Hq, Sq, Sk)
    dq, _, _ = run_dense_bwd(q, k, v, "bwd bias", bias=bias, causal=True, top_left=True, with_dlse=True)
    assert (dq[:, 7] == 0).all()  # the masked row: lse -inf, no gradient (its grad_lse is ignored)
    b2 = torch.randn(B, Hq, Sk, Sq).transpose(-1, -2)
    run_dense_bwd(q, k, v, "bwd transposed bias", bias=b2, with_dlse=True)
    # seqused_k: keys past each prefix are never read (NaN there) and get zero gradient
    k, v = k.clone(), v.clone()
    used = torch.tensor([33, 0], dtype=torch.int32)
    k[0, 33:], v[0, 33:], k[1], v[1] = (float("nan"),) * 4
    for causal in (False, True):
        dq, dk, dv = run_dense_bwd(q, k, v, f"bwd seqused_k causal={causal}", used=used, causal=causal, with_dlse=True)
        assert (dk[0, 33:] == 0).all() and (dv[0, 33:] == 0).all() and (dk[1] == 0).all() and (dq[1] == 0).all()


def test_backward_split_key_blocks():
    """Few head groups for the threads: each group's key blocks are split over items with their
    own dq accumulators (cut at equal cost when causal)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        q, k, v = bhsd(1, 150, 2, 32, torch.float32), bhsd(1, 300, 1, 32, torch.float32), bhsd(1, 300, 1, 32, torch.float32)
        for causal in (False, True):
            run_dense_bwd(q, k, v, f"bwd split causal={causal}", causal=causal)
    finally:
        torch.set_num_threads(threads)


def test_backward_nan_propagates():
    """A NaN in a row's query reaches its dq and the gradients of every key it sees (its lse is
    NaN, not -inf); other rows and heads keep finite gradients, equal to the reference's."""
    q, k, v = torch.randn(1, 20, 2, 32), torch.randn(1, 30, 2, 32), torch.randn(1, 30, 2, 32)
    q[0, 3, 1, 5] = float("nan")
    out, lse, stats = op(q, k, v, causal=True)  # bottom-right: query 3 sees keys 0..13
    g = torch.randn_like(out)
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    o64, _ = dense_reference(*x64, causal=True)
    exp = torch.autograd.grad(o64, x64, g.double())
    scale = 1 / math.sqrt(32)
    blockwise = torch.ops.lmkern.attention_bwd_blockwise(g, None, q, k, v, out, None, None, None, None, True, False, scale)
    for dq, dk, dv in (bwd_op(g, q, k, v, out, stats, causal=True), blockwise):
        assert dq[0, 3, 1].isnan().all() and not dq[0, :, 0].isnan().any() and not dq[0, 4:, 1].isnan().any()
        assert dk[0, :14, 1].isnan().all() and dv[0, :14, 1].isnan().all()
        for got, e in ((dq[0, :, 0], exp[0][0, :, 0]), (dk[0, :, 0], exp[1][0, :, 0]), (dv[0, :, 0], exp[2][0, :, 0])):
            torch.testing.assert_close(got.double(), e, atol=1e-5, rtol=1e-5)


def test_backward_empty_inputs():
    for B, Sq, Sk, D in [(0, 5, 5, 32), (2, 0, 5, 32), (2, 5, 0, 32), (2, 5, 5, 0)]:
        q, k, v = torch.randn(B, Sq, 4, D), torch.randn(B, Sk, 2, D), torch.randn(B, Sk, 2, D)
        out, lse, stats = op(q, k, v, causal=True, scale=0.5)
        for t, x in zip(bwd_op(torch.randn_like(out), q, k, v, out, stats, causal=True, scale=0.5), (q, k, v)):
            assert t.shape == x.shape and (t == 0).all()
    cu = torch.zeros(1, dtype=torch.int32)  # zero sequences
    q, k = torch.randn(0, 4, 32), torch.randn(0, 2, 32)
    out, lse, stats = op(q, k, k, None, cu, cu)
    dq, dk, dv = bwd_op(out, q, k, k, out, stats, None, cu, cu)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


def test_backward_bad_inputs():
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    out, lse, stats = op(q, k, v)
    cases = [
        ("attention_bwd: k must have q's dtype", lambda: bwd_op(out, q, k.half(), v, out, stats)),
        ("out must have q's shape", lambda: bwd_op(out, q, k, v, out[:, :7], stats)),
        ("out must have q's dtype", lambda: bwd_op(out, q, k, v, out.half(), stats)),
        ("grad_out must have q's shape", lambda: bwd_op(out[0], q, k, v, out, stats)),
        ("grad_out must have q's dtype", lambda: bwd_op(out.double(), q, k, v, out, stats)),
        ("grad_out must have stride 1", lambda: bwd_op(out.transpose(-1, -2).contiguous().transpose(-1, -2), q, k, v, out, stats)),
        ("stats must be float32", lambda: bwd_op(out, q, k, v, out, stats.double())),
        ("stats must have shape", lambda: bwd_op(out, q, k, v, out, stats[:, :, :, :7])),
        ("stats must have shape", lambda: bwd_op(out, q, k, v, out, lse)),
        ("grad_lse must have shape", lambda: bwd_op(out, q, k, v, out, stats, grad_lse=lse[0])),
        ("grad_lse must be float32", lambda: bwd_op(out, q, k, v, out, stats, grad_lse=lse.half())),
        ("seqused_k values", lambda: bwd_op(out, q, k, v, out, stats, used=torch.tensor([1, 10], dtype=torch.int32))),
    ]
    for match, call in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_opcheck_backward():
    q, k, v = bhsd(2, 9, 4, 32, torch.float32), bhsd(2, 11, 2, 32, torch.float32), bhsd(2, 11, 2, 32, torch.float32)
    bias = torch.randn(9, 11).expand(2, 4, 9, 11)
    used = torch.tensor([4, 11], dtype=torch.int32)
    qp, kp, vp, cu_q, cu_k = varlen_case(torch.float32, [3, 6], [5, 4], 4, 2, 32)
    for q_, k_, v_, b, cq, ck, u, causal in [
        (q, k, v, None, None, None, None, True),
        (q, k, v, bias, None, None, used, False),
        (qp, kp, vp, None, cu_q, cu_k, None, True),
    ]:
        out, lse, stats = torch.ops.lmkern.attention_fwd(q_, k_, v_, b, cq, ck, u, 9, 11, causal, False, 0.2)
        args = (torch.randn_like(out), torch.randn_like(lse), q_, k_, v_, out, stats, b, cq, ck, u, 9, 11, causal, False, 0.2)
        torch.library.opcheck(torch.ops.lmkern.attention_bwd, args)


PORTABLE_SCRIPT = """
import sys, torch, lmkern
from lmkern import _C
assert _C.cpu_isa() == "portable", _C.cpu_isa()
cases, grad_outs = torch.load(sys.argv[1])
results = []
for c, g in zip(cases, grad_outs):
    q, k, v, bias, cu_q, cu_k, used, max_q, max_k, causal, top_left, scale = c
    out, lse, stats = torch.ops.lmkern.attention_fwd(*c)
    grads = torch.ops.lmkern.attention_bwd(g, None, q, k, v, out, stats, *c[3:])
    results.append(((out, lse, stats), grads))
torch.save(results, sys.argv[2])
"""


def test_portable_isa(tmp_path):
    """The portable (non-x86) kernels, forward and backward, selected with LMKERN_CPU_ISA in a
    fresh process."""
    cases, grad_outs, refs = [], [], []
    # (Sq = 1: items of two rows, the few-row kernel)
    for dtype, D, causal, Sq in [(torch.float32, 80, True, 37), (torch.bfloat16, 3, False, 37),
                                 (torch.float16, 64, True, 37), (torch.float32, 20, True, 1)]:
        q, k, v = bhsd(2, Sq, 4, D, dtype), bhsd(2, 71, 2, D, dtype), bhsd(2, 71, 2, D, dtype)
        used = torch.tensor([71, 20], dtype=torch.int32)
        cases.append((q, k, v, None, None, None, used, 0, 0, causal, False, 0.3))
        grad_outs.append(torch.randn(q.shape).to(dtype))
        kw = dict(used=used, causal=causal, scale=0.3)
        refs.append((dense_reference(q, k, v, **kw), dense_reference(q, k, v, lowp=True, **kw),
                     dense_reference(q.float(), k.float(), v.float(), lowp=True, **kw)[1], kw))
    torch.save((cases, grad_outs), tmp_path / "in.pt")
    env = dict(os.environ, LMKERN_CPU_ISA="portable")
    subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    results = torch.load(tmp_path / "out.pt")
    for case, g, ((out, lse, stats), grads), (ref, ref_lp, ref32, kw) in zip(cases, grad_outs, results, refs):
        check(out, lse, ref, ref_lp, ref32, f"portable {out.dtype}")
        check_row_stats(lse, stats, keys=case[1].shape[1], what=f"portable {out.dtype}")
        fn_ref = lambda q, k, v, lowp: dense_reference(q, k, v, lowp=lowp, **kw)  # noqa: E731
        check_grads(grads, case[:3], fn_ref, g, None, f"portable bwd {out.dtype}")
