"""The CUDA attention kernels through their ops, torch.ops.lmkern.attention_decode and
torch.ops.lmkern.attention_fwd, against the specification (lmkern.reference.attention) in float64.

Every case the kernels accept is covered: decode in fp32/fp16/bf16 with head dims from 8 to 256,
GQA/MQA, causal or not, any number of splits, cache_seqlens of 0 and beyond the cache, NaN past
each row's prefix, strided and misaligned views; the forward in fp16/bf16 with its head dims,
dense and packed (varlen) inputs, both causal alignments, additive bias (broadcast, -inf),
seqused_k, fully masked rows. Also the rejections of what the kernels do not support. Inputs are
fresh random tensors each run (tests/conftest.py seeds them).

Runs only where lmkern._C has the CUDA kernels and a GPU is present.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attention_helpers import check_row_stats

from lmkern import _ext
from lmkern.reference import attention as ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
    reason="needs a GPU and lmkern._C built with CUDA",
)

INF = float("inf")
# out: the kernels round once (decode) or also round the probabilities to the input type before
# P @ V (forward, as FlashAttention does); lse is fp32 math.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_TOL = 2e-4


def expand_kv(k, hq):
    """(..., Hkv, S, D) -> (..., Hq, S, D), query head h reading kv head h // (Hq // Hkv)."""
    return k.repeat_interleave(hq // k.shape[-3], dim=-3)


def core64(q, k, v, scale, allowed, bias=None):
    """float64 (out, lse) of one sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D), allowed (Sq, Sk)
    bool, bias (Hq, Sq, Sk) or None."""
    qt = q.double().transpose(0, 1)
    kt = expand_kv(k.double().transpose(0, 1), qt.shape[0])
    vt = expand_kv(v.double().transpose(0, 1), qt.shape[0])
    out, lse = ref.attention_core(qt, kt, vt, scale, allowed, None if bias is None else bias.double())
    return out.transpose(0, 1), lse  # (Sq, Hq, D), (Hq, Sq)


def assert_attention_close(out, lse, out64, lse64, dtype, what):
    assert out.dtype == dtype and lse.dtype == torch.float32, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse.double()), dead), f"{what}: lse -inf pattern"
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), out64.to(dtype).double(), rtol=tol, atol=tol, msg=what)
    live = ~dead
    torch.testing.assert_close(lse.double()[live], lse64[live], rtol=LSE_TOL, atol=LSE_TOL, msg=what)
    # rows that see no key: exactly zero
    dead_rows = dead.transpose(-1, -2) if out.dim() == 4 else dead.transpose(0, 1)
    assert (out[dead_rows] == 0).all(), f"{what}: a fully masked row is not zero"


# ----------------------------------------------------------------------------- decode


def decode64(q, k_cache, v_cache, lens, causal, scale):
    B, Sq, Hq, D = q.shape
    Smax = k_cache.shape[1]
    outs, lses = [], []
    for b in range(B):
        L = max(0, min(int(lens[b]), Smax))  # slots read; the causal diagonal uses lens[b]
        j = torch.arange(L, device=q.device)
        i = torch.arange(Sq, device=q.device)
        allowed = torch.ones(Sq, L, dtype=torch.bool, device=q.device)
        if causal:
            allowed = j[None, :] <= i[:, None] + int(lens[b]) - Sq
        o, l = core64(q[b], k_cache[b, :L], v_cache[b, :L], scale, allowed)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def run_decode(q, k, v, lens, causal, scale, num_splits):
    return torch.ops.lmkern.attention_decode(q, k, v, lens, causal, scale, num_splits)


def decode_inputs(B, Sq, Hq, Hkv, D, Smax, dtype, lens):
    q = torch.randn(B, Sq, Hq, D, device="cuda").to(dtype)
    k = torch.randn(B, Smax, Hkv, D, device="cuda").to(dtype)
    v = torch.randn(B, Smax, Hkv, D, device="cuda").to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # slots past each row's prefix hold NaN: the kernel must never read them
    pos = torch.arange(Smax, device="cuda")[None, :, None, None]
    past = pos >= lens.long().clamp(max=Smax)[:, None, None, None]
    k = k.masked_fill(past, float("nan"))
    v = v.masked_fill(past, float("nan"))
    return q, k, v, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 32, 64, 80, 96, 128, 136, 256])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("Sq", [1, 3, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_decode_matches_reference(dtype, D, heads, Sq, causal):
    Hq, Hkv = heads
    Smax = 300
    lens = [1, 300, 517, 0, 129]  # 517 > Smax reads the whole cache; 0 sees nothing
    q, k, v, lens_t = decode_inputs(len(lens), Sq, Hq, Hkv, D, Smax, dtype, lens)
    scale = 1 / math.sqrt(D)
    out64, lse64 = decode64(q, k, v, lens_t, causal, scale)
    for splits in (0, 1, 3, 64):
        out, lse = run_decode(q, k, v, lens_t, causal, scale, splits)
        assert out.shape == q.shape and lse.shape == (len(lens), Hq, Sq)
        assert_attention_close(out, lse, out64, lse64, dtype, f"decode {dtype} D={D} {heads} Sq={Sq} "
                               f"causal={causal} splits={splits}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_long_cache_many_splits(dtype):
    B, Sq, Hq, Hkv, D, Smax = 2, 1, 32, 8, 128, 20000
    q, k, v, lens = decode_inputs(B, Sq, Hq, Hkv, D, Smax, dtype, [19999, 7777])
    out64, lse64 = decode64(q, k, v, lens, True, 0.3)
    for splits in (0, 1, 7, 256, 1000):
        out, lse = run_decode(q, k, v, lens, True, 0.3, splits)
        assert_attention_close(out, lse, out64, lse64, dtype, f"long cache splits={splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_strided_and_misaligned_views(dtype):
    B, Sq, Hq, Hkv, D, Smax = 3, 2, 8, 4, 64, 100
    lens = torch.tensor([100, 37, 5], dtype=torch.int32, device="cuda")
    # a cache inside a bigger buffer (padded head dim, extra slots), a transposed q
    kbuf = torch.randn(B, Smax + 7, Hkv, D + 8, device="cuda").to(dtype)
    vbuf = torch.randn(B, Hkv, Smax + 7, D + 8, device="cuda").to(dtype)
    k = kbuf[:, 3 : 3 + Smax, :, :D]
    v = vbuf[:, :, 2 : 2 + Smax, 8:].transpose(1, 2)
    q = torch.randn(B, Hq, Sq, D, device="cuda").to(dtype).transpose(1, 2)
    out64, lse64 = decode64(q, k, v, lens, True, 0.125)
    out, lse = run_decode(q, k, v, lens, True, 0.125, 0)
    assert out.is_contiguous()
    assert_attention_close(out, lse, out64, lse64, dtype, "strided views")
    # views starting one element into the buffer: not 16-byte aligned (copied by the glue)
    qm = torch.randn(B * Sq * Hq * D + 1, device="cuda").to(dtype)[1:].view(B, Sq, Hq, D)
    km = torch.randn(B * Smax * Hkv * D + 1, device="cuda").to(dtype)[1:].view(B, Smax, Hkv, D)
    out64, lse64 = decode64(qm, km, v, lens, False, 0.125)
    out, lse = run_decode(qm, km, v, lens, False, 0.125, 2)
    assert_attention_close(out, lse, out64, lse64, dtype, "misaligned views")


def test_decode_all_rows_empty():
    q, k, v, lens = decode_inputs(2, 4, 4, 2, 64, 16, torch.float16, [0, 0])
    for splits in (0, 1, 5):
        out, lse = run_decode(q, k, v, lens, True, 0.125, splits)
        assert (out == 0).all() and torch.isneginf(lse).all()
    # causal with more queries than keys: the first Sq - L rows see nothing
    q, k, v, lens = decode_inputs(1, 8, 2, 1, 64, 16, torch.float16, [3])
    out64, lse64 = decode64(q, k, v, lens, True, 0.125)
    out, lse = run_decode(q, k, v, lens, True, 0.125, 0)
    assert torch.isneginf(lse[0, :, :5]).all()
    assert_attention_close(out, lse, out64, lse64, torch.float16, "Sq > L causal")


def test_decode_rejects_unsupported():
    q, k, v, lens = decode_inputs(1, 1, 4, 2, 64, 16, torch.float16, [16])
    with pytest.raises(ValueError, match="head_dim"):
        run_decode(q[..., :60], k[..., :60], v[..., :60], lens, True, 0.1, 0)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        run_decode(q, k, v, lens.long(), True, 0.1, 0)
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        run_decode(q, k.float(), v, lens, True, 0.1, 0)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        run_decode(q[:, :, :3], k, v, lens, True, 0.1, 0)
    with pytest.raises(ValueError, match="num_splits"):
        run_decode(q, k, v, lens, True, 0.1, -1)


# ----------------------------------------------------------------------------- forward


def fwd64(q, k, v, bias, cu_q, cu_k, seqused, causal, top_left, scale):
    """float64 (out, lse) in the op's layout, one sequence at a time."""
    packed = cu_q is not None
    if packed:
        B = cu_q.numel() - 1
        total_q, Hq = q.shape[0], q.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
        lse = torch.full((Hq, total_q), -INF, dtype=torch.float64, device=q.device)
    else:
        B, Sq_all, Hq = q.shape[0], q.shape[1], q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
        lse = torch.full((B, Hq, Sq_all), -INF, dtype=torch.float64, device=q.device)
    for b in range(B):
        if packed:
            q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
            qb, kb, vb = q[q0:q1], k[k0:k1], v[k0:k1]
        else:
            qb, kb, vb = q[b], k[b], v[b]
        Sq_b, Sk_b = qb.shape[0], kb.shape[0]
        if seqused is not None:
            Sk_b = min(Sk_b, int(seqused[b]))
        kb, vb = kb[:Sk_b], vb[:Sk_b]
        i = torch.arange(Sq_b, device=q.device)[:, None]
        j = torch.arange(Sk_b, device=q.device)[None, :]
        allowed = torch.ones(Sq_b, Sk_b, dtype=torch.bool, device=q.device)
        if causal:
            allowed = j <= i + (0 if top_left else Sk_b - Sq_b)
        bb = None
        if bias is not None:
            bb = bias.expand(B, Hq, Sq_b, bias.shape[-1])[b, :, :, :Sk_b]
        o, l = core64(qb, kb, vb, scale, allowed, bb)
        if packed:
            out[q0:q1], lse[:, q0:q1] = o, l
        else:
            out[b], lse[b] = o, l
    return out, lse


def run_fwd(q, k, v, bias=None, cu_q=None, cu_k=None, seqused=None, max_q=0, max_k=0,
            causal=False, top_left=False, scale=0.125):
    """(out, lse), after checking the backward's stats against the lse: log2-domain (row max,
    log-sum) with (m + ls) ln 2 = lse, (-inf, 0) on rows without keys."""
    out, lse, stats = torch.ops.lmkern.attention_fwd(q, k, v, bias, cu_q, cu_k, seqused, max_q, max_k,
                                                     causal, top_left, scale)
    check_row_stats(lse, stats, base=2)
    return out, lse


CAUSAL = [(False, False), (True, False), (True, True)]  # (causal, causal_top_left)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("Sq, Sk", [(1, 1), (77, 200), (200, 77), (128, 128), (5, 300)])
@pytest.mark.parametrize("causal, top_left", CAUSAL)
def test_fwd_dense_matches_reference(dtype, D, Sq, Sk, causal, top_left):
    B, Hq, Hkv = 2, 4, 2
    q = torch.randn(B, Sq, Hq, D, device="cuda").to(dtype)
    k = torch.randn(B, Sk, Hkv, D, device="cuda").to(dtype)
    v = torch.randn(B, Sk, Hkv, D, device="cuda").to(dtype)
    scale = 1 / math.sqrt(D)
    out, lse = run_fwd(q, k, v, causal=causal, top_left=top_left, scale=scale)
    assert out.shape == q.shape and lse.shape == (B, Hq, Sq)
    out64, lse64 = fwd64(q, k, v, None, None, None, None, causal, top_left, scale)
    assert_attention_close(out, lse, out64, lse64, dtype, f"fwd {dtype} D={D} {Sq}x{Sk} causal={causal}/{top_left}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal, top_left", CAUSAL)
def test_fwd_bias_and_seqused(dtype, causal, top_left):
    B, Sq, Sk, Hq, Hkv, D = 3, 70, 150, 6, 1, 64
    q = torch.randn(B, Sq, Hq, D, device="cuda").to(dtype)
    k = torch.randn(B, Sk, Hkv, D, device="cuda").to(dtype)
    v = torch.randn(B, Sk, Hkv, D, device="cuda").to(dtype)
    full = torch.randn(B, Hq, Sq, Sk, device="cuda")
    full[:, :, :, 5:9] = -INF
    full[1, 2, 3, :] = -INF  # one fully masked row
    row_bias = torch.randn(1, 1, Sq, Sk, device="cuda").expand(B, Hq, Sq, Sk)  # 0 strides
    col_bias = torch.randn(Sk, Sq, device="cuda").t().expand(B, Hq, Sq, Sk)  # transposed, 0 strides
    seqused = torch.tensor([150, 40, 0], dtype=torch.int32, device="cuda")
    for bias in (full, row_bias, col_bias, None):
        for used in (None, seqused):
            out, lse = run_fwd(q, k, v, bias, None, None, used, causal=causal, top_left=top_left)
            out64, lse64 = fwd64(q, k, v, bias, None, None, used, causal, top_left, 0.125)
            assert_attention_close(out, lse, out64, lse64, dtype,
                                   f"bias {None if bias is None else bias.stride()} seqused={used is not None}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal, top_left", CAUSAL)
def test_fwd_varlen_matches_reference(dtype, D, causal, top_left):
    Hq, Hkv = 4, 1
    lq = [17, 0, 130, 1, 64]
    lk = [17, 5, 200, 0, 33]
    cu_q = torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *itertools.accumulate(lk)], dtype=torch.int32, device="cuda")
    extra = 3  # packed rows past cu_seqlens_q[-1] belong to no sequence: zeros, lse -inf
    q = torch.randn(sum(lq) + extra, Hq, D, device="cuda").to(dtype)
    k = torch.randn(sum(lk), Hkv, D, device="cuda").to(dtype)
    v = torch.randn(sum(lk), Hkv, D, device="cuda").to(dtype)
    for max_q in (max(lq), 1):  # a too-small max_seqlen_q hint costs time, not results
        out, lse = run_fwd(q, k, v, None, cu_q, cu_k, None, max_q, max(lk), causal, top_left, 0.1)
        assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
        out64, lse64 = fwd64(q, k, v, None, cu_q, cu_k, None, causal, top_left, 0.1)
        assert_attention_close(out, lse, out64, lse64, dtype, f"varlen D={D} causal={causal}/{top_left}")
    used = torch.tensor([3, 5, 150, 0, 40], dtype=torch.int32, device="cuda")
    out, lse = run_fwd(q, k, v, None, cu_q, cu_k, used, max(lq), max(lk), causal, top_left, 0.1)
    out64, lse64 = fwd64(q, k, v, None, cu_q, cu_k, used, causal, top_left, 0.1)
    assert_attention_close(out, lse, out64, lse64, dtype, "varlen seqused_k")


def test_fwd_strided_inputs():
    B, S, H, D = 2, 96, 4, 128
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.float16)
    q, k, v = qkv.unbind(2)  # interleaved q/k/v
    out, lse = run_fwd(q, k, v, causal=True)
    out64, lse64 = fwd64(q, k, v, None, None, None, None, True, False, 0.125)
    assert_attention_close(out, lse, out64, lse64, torch.float16, "packed qkv views")
    qm = torch.randn(B * S * H * D + 1, device="cuda", dtype=torch.float16)[1:].view(B, S, H, D)
    out, lse = run_fwd(qm, k, v)
    out64, lse64 = fwd64(qm, k, v, None, None, None, None, False, False, 0.125)
    assert_attention_close(out, lse, out64, lse64, torch.float16, "misaligned q")


def test_fwd_rejects_unsupported():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        run_fwd(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head_dim"):
        run_fwd(q[..., :48], q[..., :48], q[..., :48])
    with pytest.raises(ValueError, match="head_dim_v == head_dim"):
        run_fwd(q, q, q[..., :32])
    packed = q[0]
    cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    bias = torch.zeros(1, 2, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="bias with packed"):
        run_fwd(packed, packed, packed, bias, cu, cu, None, 8, 8)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        run_fwd(packed, packed, packed, None, cu.long(), cu, None, 8, 8)
