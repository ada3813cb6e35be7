"""The attention reference and the public attention functions, against independent float64 math.

Expected values come from torch.nn.functional.scaled_dot_product_attention in float64 where its
semantics are lmkern's (sdpa layout, top-left causal, masks, GQA), and from a hand-written
float64 loop over sequences and query rows (``naive``) for flash-attn's bottom-right causal,
varlen and the kv-cache. Inputs are fresh random tensors each run (tests/conftest.py seeds them).
Every test here runs the reference backend (LMKERN_BACKEND=reference); the kernel backends are
tested against the same float64 math in tests/test_attention_kernels.py.
"""

import pytest
import torch
import torch.nn.functional as F

import lmkern
from lmkern.reference import attention as ref

from attention_helpers import bottom_right, naive, packed, torch_sdpa64
from helpers import assert_close_2x

LOWP = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LMKERN_BACKEND", "reference")


def check_lowp(out, ref64, lowp_out, what):
    """fp32-internal math rounded once: within the flash-attention 2x rule of torch's own
    computation in the input precision (lowp_out)."""
    assert out.dtype == lowp_out.dtype
    assert_close_2x(out, ref64.to(torch.float64), lowp_out, what)


# ----------------------------------------------------------------------------- sdpa (torch semantics)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S", [(1, 1), (1, 97), (97, 1), (33, 97), (97, 33), (64, 64)])
def test_sdpa_matches_torch(dtype, causal, L, S):
    q, k, v = (torch.randn(2, 3, n, 64).to(dtype) for n in (L, S, S))
    out = lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expect = torch_sdpa64(q, k, v, is_causal=causal)
    # torch's own low-precision result: its CPU math in the input dtype
    check_lowp(out, expect, F.scaled_dot_product_attention(q, k, v, is_causal=causal), f"sdpa {dtype} L={L} S={S}")


def test_sdpa_causal_is_top_left():
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for n in (5, 9, 9))
    out = ref.sdpa(q, k, v, is_causal=True)
    per_row, _ = naive(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), visible=lambda i, j: j <= i)
    torch.testing.assert_close(out[0].transpose(0, 1), per_row)


@pytest.mark.parametrize("hq, hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gqa(hq, hkv, causal):
    q = torch.randn(2, hq, 17, 32)
    k, v = torch.randn(2, hkv, 23, 32), torch.randn(2, hkv, 23, 32)
    out = lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out.double(), torch_sdpa64(q, k, v, is_causal=causal, enable_gqa=True), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "mask_shape",
    [(7, 11), (1, 11), (7, 1), (3, 1, 11), (2, 3, 7, 11), (2, 1, 1, 11), (1, 1, 7, 11)],
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_broadcast(mask_shape, kind):
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 24)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # keep every row alive here; fully masked rows have their own test
    else:
        mask = torch.randn(mask_shape) * 2
        mask[torch.rand(mask_shape) > 0.8] = float("-inf")
        mask[..., 0] = 0.0
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expect = torch_sdpa64(q, k, v, attn_mask=mask if kind == "bool" else mask.double())
    torch.testing.assert_close(out.double(), expect, atol=2e-6, rtol=1e-5)


def test_sdpa_float_mask_in_half_precision():
    q, k, v = (torch.randn(1, 2, 9, 32, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.randn(9, 9)  # a float32 mask with bf16 inputs is accepted and added in float32
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expect = torch_sdpa64(q, k, v, attn_mask=mask.double())
    check_lowp(out, expect, F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bfloat16()), "bf16 + fp32 mask")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_are_zero_with_zero_grad(kind):
    q, k, v = (torch.randn(2, 2, 6, 16, requires_grad=True) for _ in range(3))
    keep = torch.rand(6, 6) > 0.4
    keep[:, 0] = True
    keep[2] = False
    keep[5] = False
    mask = keep if kind == "bool" else torch.zeros(6, 6).masked_fill(~keep, float("-inf"))
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, [2, 5]] == 0).all()
    live = [0, 1, 3, 4]
    expect = torch_sdpa64(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out[:, :, live].double(), expect[:, :, live], atol=2e-6, rtol=1e-5)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, [2, 5]] == 0).all()


def test_sdpa_scale_and_value_head_dim():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 40)
    out = lmkern.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert out.shape == (1, 2, 5, 40)
    torch.testing.assert_close(out.double(), torch_sdpa64(q, k, v, scale=0.3), atol=2e-6, rtol=1e-5)


def test_sdpa_dropout_draws_from_torch_rng():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    torch.manual_seed(5)
    a = lmkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    b = lmkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, lmkern.scaled_dot_product_attention(q, k, v))
    assert (lmkern.scaled_dot_product_attention(q, k, v, dropout_p=1.0) == 0).all()


def test_sdpa_extra_batch_dims_and_empty():
    q, k, v = (torch.randn(2, 3, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(lmkern.scaled_dot_product_attention(q, k, v).double(), torch_sdpa64(q, k, v), atol=2e-6, rtol=1e-5)
    out = lmkern.scaled_dot_product_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8))
    assert out.shape == (1, 2, 4, 8) and (out == 0).all()


# ----------------------------------------------------------------------------- head dims and dtypes


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", LOWP)
def test_flash_head_dims(D, dtype):
    B, Sq, Sk, Hq, Hkv = 1, 19, 31, 4, 2
    q = torch.randn(B, Sq, Hq, D).to(dtype)
    k, v = torch.randn(B, Sk, Hkv, D).to(dtype), torch.randn(B, Sk, Hkv, D).to(dtype)
    out, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True)
    expect, expect_lse = naive(q[0], k[0], v[0], visible=bottom_right(Sq, Sk))
    lowp = ref.flash_attention(q, k, v, causal=True, upcast=False)  # the same math in the input dtype
    check_lowp(out[0], expect, lowp[0], f"flash D={D} {dtype}")
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse[0].double(), expect_lse, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- flash_attention


@pytest.mark.parametrize("Sq, Sk", [(1, 1), (1, 97), (97, 1), (33, 97), (97, 33), (40, 40)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
def test_flash_dense(Sq, Sk, causal, hq, hkv):
    B, D = 2, 32
    q = torch.randn(B, Sq, hq, D)
    k, v = torch.randn(B, Sk, hkv, D), torch.randn(B, Sk, hkv, D)
    out, lse = lmkern.flash_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, hq, Sq)
    visible = bottom_right(Sq, Sk) if causal else (lambda i, j: True)
    for b in range(B):
        expect, expect_lse = naive(q[b], k[b], v[b], visible=visible)
        torch.testing.assert_close(out[b].double(), expect, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse[b].double(), expect_lse, atol=2e-6, rtol=1e-5)


def test_flash_bottom_right_fully_masked_rows():
    # Sq > Sk, causal: rows i < Sq - Sk see no key: zeros, lse -inf, zero gradient
    q = torch.randn(1, 7, 2, 16, requires_grad=True)
    k, v = torch.randn(1, 3, 2, 16, requires_grad=True), torch.randn(1, 3, 2, 16, requires_grad=True)
    out, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True)
    assert (out[0, :4] == 0).all() and (out[0, 4:] != 0).any()
    assert torch.isneginf(lse[0, :, :4]).all() and torch.isfinite(lse[0, :, 4:]).all()
    (out.sum() + lse[..., 4:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0, :4] == 0).all()


def test_flash_conventions_differ_from_sdpa_when_lengths_differ():
    q = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    k, v = torch.randn(1, 9, 2, 16, dtype=torch.float64), torch.randn(1, 9, 2, 16, dtype=torch.float64)
    flash = lmkern.flash_attention(q, k, v, causal=True)
    top_left = lmkern.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    assert not torch.allclose(flash, top_left.transpose(1, 2))
    # bottom-right causal is sdpa with the mask tril(diagonal=Sk - Sq)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    br = torch_sdpa64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(flash, br.transpose(1, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (3, 1)])
def test_flash_varlen_equals_per_sequence(causal, hq, hkv):
    lens_q, lens_k = [1, 97, 0, 13, 40], [5, 97, 3, 1, 64]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, hq, hkv, 32)
    out, lse = lmkern.flash_attention(
        q, k, v, causal=causal, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=97, max_seqlen_k=97
    )
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        visible = bottom_right(lens_q[b], lens_k[b]) if causal else (lambda i, j: True)
        expect, expect_lse = naive(q[sq], k[sk], v[sk], visible=visible)
        torch.testing.assert_close(out[sq].double(), expect, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, sq].double(), expect_lse, atol=2e-6, rtol=1e-5)


def test_flash_varlen_equals_dense_for_equal_lengths():
    B, S, H, D = 3, 17, 2, 32
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    dense, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True)
    packed, plse = lmkern.flash_attention(
        q.reshape(B * S, H, D), k.reshape(B * S, H, D), v.reshape(B * S, H, D),
        causal=True, return_lse=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
    )
    torch.testing.assert_close(packed.reshape(B, S, H, D), dense)
    torch.testing.assert_close(plse, lse.permute(1, 0, 2).reshape(H, B * S))


def test_flash_softmax_scale_and_noncontiguous():
    q = torch.randn(2, 8, 12, 3).permute(0, 3, 1, 2)[..., ::2]  # (2, 3, 8, 6) non-contiguous
    k = torch.randn(2, 3, 8, 12)[..., ::2]
    v = torch.randn(2, 3, 8, 12)[..., 1::2]
    q = q.reshape(2, 3, 8, 6).transpose(1, 2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (2, 8, 3, 6), strided
    out = lmkern.flash_attention(q, k, v, softmax_scale=0.7)
    for b in range(2):
        expect, _ = naive(q[b], k[b], v[b], scale=0.7)
        torch.testing.assert_close(out[b].double(), expect, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- kv cache


@pytest.mark.parametrize("Sq", [1, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (4, 1)])
def test_kvcache_equals_attention_over_the_prefix(Sq, causal, hq, hkv):
    B, Smax, D = 4, 97, 64
    q = torch.randn(B, Sq, hq, D)
    kc, vc = torch.randn(B, Smax, hkv, D), torch.randn(B, Smax, hkv, D)
    lens = torch.tensor([97, 1, 3, 50], dtype=torch.int32)
    kc[1, 1:] = float("nan")  # slots past the prefix are never read into the result
    vc[1, 1:] = float("nan")
    out = lmkern.attention_with_kvcache(q, kc, vc, lens, causal=causal)
    assert out.shape == q.shape
    for b in range(B):
        L = int(lens[b])
        visible = bottom_right(Sq, L) if causal else (lambda i, j: True)
        expect, _ = naive(q[b], kc[b, :L], vc[b, :L], visible=visible)
        torch.testing.assert_close(out[b].double(), expect, atol=2e-6, rtol=1e-5)
    # row 1 (one key, Sq up to 5, causal) has rows that see nothing: zeros, not NaN
    assert torch.isfinite(out).all()


def test_kvcache_matches_flash_on_the_prefix_and_int_seqlens():
    # float32 and float32 tolerances, not bitwise: the cache's softmax and P @ V reduce over all
    # 20 slots (the 8 past the prefix as exact zeros), flash's over 12, and a different reduction
    # length may round the last bit differently (about 1% of bfloat16 draws did).
    q = torch.randn(2, 3, 4, 32)
    kc, vc = (torch.randn(2, 20, 2, 32) for _ in range(2))
    out = lmkern.attention_with_kvcache(q, kc, vc, 12)
    expect = lmkern.flash_attention(q, kc[:, :12], vc[:, :12], causal=True)
    torch.testing.assert_close(out, expect)


# ----------------------------------------------------------------------------- gradients


def _dbl(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_sdpa():
    q, k, v = _dbl(1, 4, 5, 8), _dbl(1, 2, 6, 8), _dbl(1, 2, 6, 4)
    mask = torch.randn(4, 5, 6, dtype=torch.float64)
    mask[1, 2] = float("-inf")  # a fully masked row
    assert torch.autograd.gradcheck(lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), (q, k, v))
    keep = torch.rand(5, 6) > 0.5
    assert torch.autograd.gradcheck(lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v))


def test_gradcheck_flash_with_lse():
    q, k, v = _dbl(1, 6, 2, 8), _dbl(1, 4, 1, 8), _dbl(1, 4, 1, 8)

    def f(q, k, v):
        out, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_varlen_and_kvcache():
    q, k, v, cu_q, cu_k = packed([3, 1, 4], [2, 5, 4], 2, 1, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: lmkern.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), (q, k, v)
    )
    q, kc, vc = _dbl(2, 2, 2, 8), _dbl(2, 5, 1, 8), _dbl(2, 5, 1, 8)
    lens = torch.tensor([5, 1], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, kc, vc: lmkern.attention_with_kvcache(q, kc, vc, lens), (q, kc, vc))


def test_low_precision_gradients_are_finite_and_in_input_dtype():
    q, k, v = (torch.randn(1, 9, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    lmkern.flash_attention(q, k, v, causal=True).float().sum().backward()
    for t in (q, k, v):
        assert t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------- dispatch


def test_float64_stays_float64():
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    out, lse = lmkern.flash_attention(q, q, q, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


# ----------------------------------------------------------------------------- bad input


def _qkv(B=2, S=5, H=4, D=8, **kw):
    return (torch.randn(B, S, H, D, **kw) for _ in range(3))


def test_bad_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k has dtype"):
        lmkern.flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="v has dtype"):
        lmkern.flash_attention(q, k, v.double())
    with pytest.raises(TypeError, match="q must be a floating-point"):
        lmkern.flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="value must be a floating-point"):
        lmkern.scaled_dot_product_attention(q, k, v.int())
    with pytest.raises(TypeError, match="k_cache has dtype"):
        lmkern.attention_with_kvcache(q, k.bfloat16(), v, torch.full((2,), 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="query must be a Tensor"):
        lmkern.scaled_dot_product_attention([1.0], k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_different_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k is on"):
        lmkern.flash_attention(q, k.cuda(), v)


def test_different_devices_meta():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="v is on meta"):
        lmkern.flash_attention(q, k, v.to("meta"))


def test_bad_ranks_and_head_dims():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be 4-D"):
        lmkern.flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="query must be at least 3-D"):
        lmkern.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="k's head dim"):
        lmkern.flash_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v's head dim"):
        lmkern.flash_attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match="key's head dim"):
        lmkern.scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="k must have q's batch"):
        lmkern.flash_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="v must have k's shape"):
        lmkern.flash_attention(q, k, v[:, :3])


def test_heads_must_divide():
    q, k, v = _qkv(H=6)
    with pytest.raises(ValueError, match="key/value heads \\(4, in k\\)"):
        lmkern.flash_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="enable_gqa"):
        lmkern.scaled_dot_product_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="key/value heads"):
        lmkern.scaled_dot_product_attention(q, k[:, :4], v[:, :4], enable_gqa=True)
    with pytest.raises(ValueError, match="in k_cache"):
        lmkern.attention_with_kvcache(q, k[:, :, :4], v[:, :, :4], 3)


def test_bad_masks_and_flags():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        lmkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        lmkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        lmkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="not both"):
        lmkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        lmkern.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="scale"):
        lmkern.scaled_dot_product_attention(q, k, v, scale="big")
    with pytest.raises(TypeError, match="is_causal"):
        lmkern.scaled_dot_product_attention(q, k, v, is_causal=1)
    with pytest.raises(TypeError, match="causal"):
        lmkern.flash_attention(*_qkv(), causal="yes")
    with pytest.raises(TypeError, match="return_lse"):
        lmkern.flash_attention(*_qkv(), return_lse=None)
    with pytest.raises(ValueError, match="softmax_scale"):
        lmkern.flash_attention(*_qkv(), softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        lmkern.flash_attention(*_qkv(), backend="fast")


def test_bad_cu_seqlens():
    q, k, v, cu_q, cu_k = packed([3, 4], [2, 6], 2, 2, 8)
    run = lambda **kw: lmkern.flash_attention(q, k, v, **{"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **kw})  # noqa: E731
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        run(cu_seqlens_q=cu_q.long())
    with pytest.raises(ValueError, match="together"):
        lmkern.flash_attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        run(cu_seqlens_k=torch.tensor([0, 7, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]"):
        run(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        run(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="same length"):
        run(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q must be 1-D"):
        run(cu_seqlens_q=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_k = 5 is less"):
        run(max_seqlen_k=5)
    with pytest.raises(TypeError, match="max_seqlen_q"):
        run(max_seqlen_q=4.0)
    with pytest.raises(ValueError, match="q must be 3-D"):
        lmkern.flash_attention(q[None], k[None], v[None], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="max_seqlen"):
        lmkern.flash_attention(*_qkv(), max_seqlen_q=5)


def test_bad_cache_seqlens():
    q = torch.randn(2, 1, 4, 8)
    kc, vc = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        lmkern.attention_with_kvcache(q, kc, vc, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 11"):
        lmkern.attention_with_kvcache(q, kc, vc, torch.tensor([3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -1"):
        lmkern.attention_with_kvcache(q, kc, vc, torch.tensor([-1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens = 12"):
        lmkern.attention_with_kvcache(q, kc, vc, 12)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        lmkern.attention_with_kvcache(q, kc, vc, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens"):
        lmkern.attention_with_kvcache(q, kc, vc, 3.0)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        lmkern.attention_with_kvcache(q, kc, vc[:, :5], 3)
    with pytest.raises(ValueError, match="k_cache's head dim"):
        lmkern.attention_with_kvcache(q, kc[..., :4], vc[..., :4], 3)
    with pytest.raises(ValueError, match="num_splits"):
        lmkern.attention_with_kvcache(q, kc, vc, 3, num_splits=-1)
    for wrong_type in (2.0, True, "2"):
        with pytest.raises(TypeError, match="num_splits"):
            lmkern.attention_with_kvcache(q, kc, vc, 3, num_splits=wrong_type)


# ----------------------------------------------------------------------------- torch.compile


def test_traces_with_fullgraph():
    """Dynamo traces every entry point without a graph break (backend="eager": no Inductor
    compile, which the kernel tests will cover); the host-synchronizing value checks of
    cu_seqlens and cache_seqlens are skipped under compile."""
    torch._dynamo.reset()
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 7, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    cases = [
        (lambda q, k: lmkern.flash_attention(q, k, k, causal=True, return_lse=True), (q, k)),
        (lambda q, k: lmkern.attention_with_kvcache(q, k, k, lens), (q, k)),
        (lambda q, k: lmkern.flash_attention(q, k, k, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), (q[0], k[0, :5])),
        (lambda q, k: lmkern.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True), (q.transpose(1, 2), k.transpose(1, 2))),
    ]
    for fn, args in cases:
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(*args), fn(*args))
