"""The Triton attention launchers (lmkern/kernels/attention.py) called directly, against the float64
reference (lmkern/reference/attention.py): forward out and lse, the backward's dq/dk/dv through
autograd of the reference, and split-KV decoding.

On this suite's interpreter (TRITON_INTERPRET=1, CPU tensors) the kernels run with 16 x 16 tiles,
so sequences of a few dozen rows already cross several query and key blocks, causal diagonals
and partial tail blocks. Accuracy: float32 within a few ulp of the float64 reference; float16
within twice PyTorch's own float16 computation error (tests/helpers.py assert_close_2x)."""

from __future__ import annotations

import math

import pytest
import torch
from attention_helpers import check_row_stats, tile_pairs
from helpers import assert_close_2x, poisoned_empty

import lmkern
from lmkern import _ext
from lmkern.reference import attention as reference

pytestmark = [
    pytest.mark.skipif(not _ext.HAS_TRITON, reason=f"no Triton: {_ext.TRITON_ERROR}"),
    pytest.mark.skipif(
        _ext.HAS_TRITON and not _ext.TRITON_INTERPRET and not torch.cuda.is_available(),
        reason="Triton kernels compiled for a GPU, and there is none (set TRITON_INTERPRET=1 to run them on CPU)",
    ),
]

if _ext.HAS_TRITON:
    from lmkern.kernels import attention as kernels

DEVICE = "cuda" if torch.cuda.is_available() and not _ext.TRITON_INTERPRET else "cpu"


# ----------------------------------------------------------------------------- helpers


def _randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _allowed_dense(B, Sq, Sk, causal, top_left, seqused=None):
    """(B, 1, Sq, Sk) bool: key j visible to query i of batch b."""
    i = torch.arange(Sq, device=DEVICE).view(1, 1, Sq, 1)
    j = torch.arange(Sk, device=DEVICE).view(1, 1, 1, Sk)
    sk_b = torch.full((B, 1, 1, 1), Sk, device=DEVICE) if seqused is None else seqused.view(B, 1, 1, 1).long()
    allowed = j < sk_b
    if causal:
        allowed = allowed & (j <= i + (0 if top_left else sk_b - Sq))
    return allowed


def reference_dense(q, k, v, bias, allowed, scale, ct, upcast=True):
    """attention_core on (B, S, H, D) inputs converted to ct, GQA expanded; (out (B, Sq, Hq, D), lse)."""
    qt, kt, vt = (x.to(ct).transpose(1, 2) for x in (q, k, v))
    kt, vt = reference._expand_kv_heads(kt, vt, qt.shape[1], 1)
    out, lse = reference.attention_core(qt, kt, vt, scale, allowed, None if bias is None else bias.to(ct),
                                        upcast=upcast)
    return out.transpose(1, 2), lse


def run_fwd(q, k, v, bias=None, cu_q=None, cu_k=None, seqused=None, max_q=0, max_k=0, causal=False,
            top_left=False, scale=None, tile=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)  # unwritten elements show up
    if cu_q is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
        max_q, max_k = q.shape[1], k.shape[1]
    else:
        lse_shape = (q.shape[1], q.shape[0])
    lse = torch.full(lse_shape, float("nan"), device=DEVICE)
    stats = torch.full((2,) + lse_shape, float("nan"), device=DEVICE)
    kernels.attention_fwd(q, k, v, bias, cu_q, cu_k, seqused, max_q, max_k, causal, top_left, scale, out, lse,
                          stats, tile=tile)
    check_row_stats(lse, stats, base=2)
    return out, lse, stats


def run_bwd(do, q, k, v, out, stats, bias=None, cu_q=None, cu_k=None, seqused=None, max_q=0, max_k=0,
            causal=False, top_left=False, scale=None, tiles=(None, None)):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_q is None:
        max_q, max_k = q.shape[1], k.shape[1]
    grads = [torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE) for x in (q, k, v)]
    kernels.attention_bwd(do, q, k, v, out, stats, bias, cu_q, cu_k, seqused, max_q, max_k, causal, top_left,
                          scale, *grads, dkdv_tile=tiles[0], dq_tile=tiles[1])
    return grads


def check_lse(lse, ref_lse, what):
    ref_lse = ref_lse.to(torch.float64)
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), f"{what}: lse -inf exactly on the fully masked rows"
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], atol=2e-5, rtol=2e-6, msg=what)


def check_dense(q, k, v, causal, top_left, bias=None, seqused=None, backward=True, scale=None, out_terms=0.0,
                fwd_tile=None, bwd_tiles=(None, None)):
    """Forward (and backward) of the kernels against the float64 reference and torch's own
    computation in q's dtype (out_terms: assert_close_2x's term_scale for out). Returns (out,
    lse, grads) of the kernels. The tiles: launch configs (default: the launchers' choice)."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out, lse, stats = run_fwd(q, k, v, bias, seqused=seqused, causal=causal, top_left=top_left, scale=scale, tile=fwd_tile)
    allowed = _allowed_dense(B, Sq, Sk, causal, top_left, seqused)
    if seqused is not None:
        # The reference must not touch what the kernel never reads (NaN planted there).
        keep = torch.arange(Sk, device=DEVICE).view(1, Sk, 1, 1) < seqused.view(B, 1, 1, 1)
        k, v = (torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=DEVICE)) for x in (k, v))
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_dense(*inputs64, bias, allowed, scale, torch.float64)
    lowp_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    lowp_out, _ = reference_dense(*lowp_inputs, bias, allowed, scale, q.dtype, upcast=False)
    assert_close_2x(out, ref_out, lowp_out, "out", term_scale=out_terms)
    check_lse(lse, ref_lse, "lse")
    grads = None
    if backward:
        do = _randn(*out.shape, dtype=q.dtype)
        grads = run_bwd(do, q, k, v, out, stats, bias, seqused=seqused, causal=causal, top_left=top_left, scale=scale,
                        tiles=bwd_tiles)
        ref_grads = torch.autograd.grad(ref_out, inputs64, do.double())
        lowp_grads = torch.autograd.grad(lowp_out, lowp_inputs, do)
        check_grads(grads, ref_grads, lowp_grads, do, ref_out, inputs64, scale)
    return out, lse, grads


def check_grads(grads, ref_grads, lowp_grads, do, ref_out, inputs64, scale):
    """dq/dk/dv by the 2x rule. dq and dk are sums of P * (dP - delta) terms that cancel (exactly,
    in torch, when a row sees one key): their term scale is scale * |delta| * |k| (|q|), with
    delta = rowsum(dO * O)."""
    q64, k64, _ = inputs64
    delta = (do.double() * ref_out.detach()).sum(-1).abs().max().item() if do.numel() else 0.0
    terms = (scale * delta * (k64.detach().abs().max().item() if k64.numel() else 0.0),
             scale * delta * (q64.detach().abs().max().item() if q64.numel() else 0.0), 0.0)
    for name, g, r, lo, t in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads, terms):
        assert_close_2x(g, r, lo, name, term_scale=t)


# ----------------------------------------------------------------------------- dense


# (B, Sq, Sk, Hq, Hkv, D, causal, top_left, dtype)
DENSE = {
    "causal_bottom_right_sq<sk_gqa": (2, 37, 53, 4, 2, 64, True, False, torch.float32),
    "causal_top_left_sq>sk_mqa": (1, 45, 20, 2, 1, 32, True, True, torch.float32),
    "causal_bottom_right_sq>sk_d80": (1, 40, 20, 2, 2, 80, True, False, torch.float32),
    "causal_top_left_sq<sk_d128": (1, 30, 50, 2, 1, 128, True, True, torch.float32),
    "full_gqa_fp16": (2, 33, 47, 4, 2, 64, False, False, torch.float16),
    "causal_bottom_right_fp16_d80": (1, 35, 35, 3, 1, 80, True, False, torch.float16),
    "causal_top_left_fp16_d128": (1, 26, 40, 2, 2, 128, True, True, torch.float16),
    "one_query_97_keys": (2, 1, 97, 2, 1, 64, True, False, torch.float32),
    "97_queries_one_key": (1, 97, 1, 2, 2, 32, False, False, torch.float32),
    "d256_fp16": (1, 20, 24, 2, 1, 256, True, False, torch.float16),
    "d256_fp32": (1, 17, 18, 1, 1, 256, False, False, torch.float32),
    "long_causal": (1, 120, 120, 2, 1, 32, True, False, torch.float32),
}


@pytest.mark.parametrize("case", list(DENSE))
def test_dense_forward_backward(case):
    B, Sq, Sk, Hq, Hkv, D, causal, top_left, dtype = DENSE[case]
    q = _randn(B, Sq, Hq, D, dtype=dtype)
    k = _randn(B, Sk, Hkv, D, dtype=dtype)
    v = _randn(B, Sk, Hkv, D, dtype=dtype)
    out, lse, (dq, dk, dv) = check_dense(q, k, v, causal, top_left)
    if causal and not top_left and Sq > Sk:
        # The first Sq - Sk rows see no key: zeros, lse -inf, zero gradient, no NaN.
        dead = Sq - Sk
        assert torch.equal(out[:, :dead], torch.zeros_like(out[:, :dead]))
        assert torch.isneginf(lse[:, :, :dead]).all()
        assert torch.equal(dq[:, :dead], torch.zeros_like(dq[:, :dead]))


@pytest.mark.parametrize("Sq, Sk", [(5, 0), (0, 7)])
def test_empty_queries_or_keys(Sq, Sk):
    """No keys: out 0, lse -inf, dq 0. No queries: dk = dv = 0 (written, not left as garbage)."""
    q = _randn(2, Sq, 2, 32, dtype=torch.float32)
    k = _randn(2, Sk, 1, 32, dtype=torch.float32)
    v = _randn(2, Sk, 1, 32, dtype=torch.float32)
    out, lse, stats = run_fwd(q, k, v, causal=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    grads = run_bwd(torch.randn_like(q), q, k, v, out, stats, causal=True)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_longer_sequences_larger_tiles(monkeypatch):
    """One launch crossing many blocks with tiles that differ between M and N (32 x 16): the
    unmasked key range, the causal diagonal and the backward's skipped query blocks all shift."""
    monkeypatch.setattr(kernels, "CPU_FWD_BLOCK", (32, 16))
    monkeypatch.setattr(kernels, "CPU_BWD_BLOCK", (16, 32))
    q = _randn(1, 130, 2, 32, dtype=torch.float32)
    k = _randn(1, 150, 1, 32, dtype=torch.float32)
    v = _randn(1, 150, 1, 32, dtype=torch.float32)
    check_dense(q, k, v, causal=True, top_left=False)


def _gpu_tile_cases():
    """(id, D, forward tile or None, (dK/dV tile, dQ tile) or None): every GPU autotune candidate
    (kernels.fwd_tiles with the TMA and warp-specialized ones / bwd_tiles, float16). In the
    interpreter only the block shapes, TMA and the single masked loop of warp specialization
    matter (warps and stages are ignored), so there each runs once; on a GPU every config runs."""
    cases, seen = [], set()
    for D in (64, 128, 256):
        fwd = kernels.fwd_tiles(D, torch.float16, cpu=False, tma=True)
        tiles = [("fwd", t, None) for t in fwd]
        tiles += [("bwd", None, pair) for pair in tile_pairs(*kernels.bwd_tiles(D, torch.float16, cpu=False))]
        for kind, f, b in tiles:
            shape = (D, kind, (f.block_m, f.block_n, f.tma, f.warp_specialize) if f else
                     tuple((t.block_m, t.block_n) for t in b))
            if DEVICE == "cpu" and shape in seen:
                continue
            seen.add(shape)
            name = f"D{D}-{kind}-" + "-".join(str(x) for x in (f if f else b[0] + b[1]))
            cases.append(pytest.param(D, f, b, id=name))
    return cases


@pytest.mark.parametrize("D, fwd_tile, bwd_tiles", _gpu_tile_cases() if _ext.HAS_TRITON else [])
def test_every_gpu_tile_config(D, fwd_tile, bwd_tiles):
    """The tiles the GPU autotuner may pick, each against the reference: causal with Sq > Sk (rows
    that see no key), GQA, lengths that leave partial blocks of the largest tiles. A forward case
    checks the forward with that tile; a backward case runs the default forward, then the
    backward with those dK/dV and dQ tiles."""
    q = _randn(1, 150, 2, D, dtype=torch.float16)
    k = _randn(1, 139, 1, D, dtype=torch.float16)
    v = _randn(1, 139, 1, D, dtype=torch.float16)
    check_dense(q, k, v, causal=True, top_left=False, backward=bwd_tiles is not None, fwd_tile=fwd_tile,
                bwd_tiles=bwd_tiles or (None, None))


@pytest.mark.parametrize("D", [80, 32])
def test_tma_tiles_on_packed_sequences_and_padded_head_dims(D):
    """The TMA forward (one descriptor per sequence and head) on packed sequences, GQA, and a head
    dim below its power-of-two tile (the descriptor zero-fills columns past D and rows past the
    sequence), with every TMA tile."""
    if not kernels._HAS_TENSOR_DESCRIPTORS:
        pytest.skip("this Triton has no tensor descriptors (Triton 3.3+)")
    tiles = [t for t in kernels.fwd_tiles(D, torch.float16, cpu=False, tma=True, varlen=True) if t.tma]
    assert tiles and not any(t.warp_specialize for t in tiles)
    lens_q, lens_k = [70, 1, 140], [90, 33, 130]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = _randn(sum(lens_q), 4, D, dtype=torch.float16)
    k = _randn(sum(lens_k), 2, D, dtype=torch.float16)
    v = _randn(sum(lens_k), 2, D, dtype=torch.float16)
    for tile in tiles:
        out, lse, stats = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k), causal=True,
                           tile=tile)
        for b in range(3):
            sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            args = [x[None] for x in (q[sq], k[sk], v[sk])]
            allowed = _allowed_dense(1, lens_q[b], lens_k[b], True, False)
            ref_out, ref_lse = reference_dense(*args, None, allowed, D**-0.5, torch.float64)
            lowp_out, _ = reference_dense(*args, None, allowed, D**-0.5, torch.float16, upcast=False)
            assert_close_2x(out[sq][None], ref_out, lowp_out, f"out of sequence {b}, {tile}")
            check_lse(lse[:, sq][None], ref_lse, f"lse of sequence {b}, {tile}")


def test_scale_and_large_scores():
    """Forward with a non-default scale and scores around +-60: the online max must rescale. fp32
    rounding of such scores (the kernel folds log2(e) into them for exp2) moves the weights by
    ~eps * |s|, so out's term scale is max|s| * max|v|."""
    q = _randn(1, 33, 2, 32, dtype=torch.float32) * 4
    k = _randn(1, 41, 2, 32, dtype=torch.float32) * 4
    v = _randn(1, 41, 2, 32, dtype=torch.float32)
    s_max = (torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()).abs().max() * 0.7).item()
    check_dense(q, k, v, causal=True, top_left=True, scale=0.7, backward=False, out_terms=s_max * v.abs().max().item())


def test_bias_broadcast_and_masked_rows():
    """Bias as expanded views (stride 0 over batch and heads, and over queries), -inf entries,
    and rows masked entirely by the bias (zeros, lse -inf, zero gradients)."""
    B, Sq, Sk, Hq, Hkv, D = 2, 21, 35, 4, 2, 32
    q = _randn(B, Sq, Hq, D, dtype=torch.float32)
    k = _randn(B, Sk, Hkv, D, dtype=torch.float32)
    v = _randn(B, Sk, Hkv, D, dtype=torch.float32)
    base = torch.randn(1, 1, Sq, Sk, device=DEVICE)
    base[..., ::3] = float("-inf")
    base[..., 4, :] = float("-inf")  # a fully masked row
    bias = base.expand(B, Hq, Sq, Sk)
    out, lse, (dq, _, _) = check_dense(q, k, v, False, False, bias=bias)
    assert torch.equal(out[:, 4], torch.zeros_like(out[:, 4])) and torch.isneginf(lse[:, :, 4]).all()
    assert torch.equal(dq[:, 4], torch.zeros_like(dq[:, 4]))
    # Per-key bias, broadcast over queries (stride 0 in the query dim), with causal masking on top.
    keys = torch.randn(B, Hq, 1, Sk, device=DEVICE)
    keys[0, 1, 0, -5:] = float("-inf")
    check_dense(q, k, v, True, False, bias=keys.expand(B, Hq, Sq, Sk))


def test_bias_fp16():
    B, Sq, Sk, H, D = 1, 19, 30, 2, 64
    q, k, v = (_randn(B, S, H, D, dtype=torch.float16) for S in (Sq, Sk, Sk))
    bias = torch.randn(B, H, 1, 1, device=DEVICE).expand(B, H, Sq, Sk).clone()
    bias[..., 7] = float("-inf")
    check_dense(q, k, v, True, True, bias=bias)


def test_seqused_k_never_reads_past_the_prefix():
    B, Sq, Sk, Hq, Hkv, D = 3, 18, 45, 2, 1, 32
    q = _randn(B, Sq, Hq, D, dtype=torch.float32)
    k = _randn(B, Sk, Hkv, D, dtype=torch.float32)
    v = _randn(B, Sk, Hkv, D, dtype=torch.float32)
    seqused = torch.tensor([29, 0, 45], dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(seqused.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    for causal in (False, True):
        out, lse, (dq, dk, dv) = check_dense(q, k, v, causal, False, seqused=seqused)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
        assert torch.equal(dk[0, 29:], torch.zeros_like(dk[0, 29:])) and torch.equal(dk[1], torch.zeros_like(dk[1]))
        assert torch.equal(dv[0, 29:], torch.zeros_like(dv[0, 29:])) and torch.equal(dq[1], torch.zeros_like(dq[1]))


def test_non_contiguous_inputs():
    """q, k, v as slices of one packed qkv tensor, and a non-contiguous grad_out."""
    B, S, H, D = 2, 29, 2, 32
    qkv = _randn(B, S, 3, H, D + 8, dtype=torch.float32)[..., :D]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    out, lse, stats = run_fwd(q, k, v, causal=True)
    allowed = _allowed_dense(B, S, S, True, False)
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_dense(*inputs64, None, allowed, D**-0.5, torch.float64)
    lowp_out, _ = reference_dense(q, k, v, None, allowed, D**-0.5, torch.float32)
    assert_close_2x(out, ref_out, lowp_out, "out")
    check_lse(lse, ref_lse, "lse")
    do = _randn(B, H, S, D, dtype=torch.float32).transpose(1, 2)
    grads = run_bwd(do, q, k, v, out, stats, causal=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref_out, inputs64, do.double())):
        torch.testing.assert_close(g.double(), r, atol=2e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen(causal, dtype):
    """Packed sequences: an empty one, one with queries but no keys (zeros, lse -inf), and lengths
    that cross blocks and are not multiples of them."""
    lens_q = [13, 0, 5, 37, 20]
    lens_k = [29, 0, 0, 30, 20]
    Hq, Hkv, D = 4, 2, 64
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = _randn(sum(lens_q), Hq, D, dtype=dtype)
    k = _randn(sum(lens_k), Hkv, D, dtype=dtype)
    v = _randn(sum(lens_k), Hkv, D, dtype=dtype)
    max_q, max_k = max(lens_q), max(lens_k)
    out, lse, stats = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=causal)

    def ref(inputs, upcast=True):
        return reference.flash_attention(*inputs, causal=causal, return_lse=True, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, upcast=upcast)

    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    lowp_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = ref(inputs64)
    lowp_out, _ = ref(lowp_inputs, upcast=False)
    assert_close_2x(out, ref_out, lowp_out, "out")
    check_lse(lse, ref_lse, "lse")
    s2 = slice(cu_q[2].item(), cu_q[3].item())  # queries of the sequence without keys
    assert torch.equal(out[s2], torch.zeros_like(out[s2])) and torch.isneginf(lse[:, s2]).all()

    do = _randn(*q.shape, dtype=dtype)
    grads = run_bwd(do, q, k, v, out, stats, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=causal)
    check_grads(grads, torch.autograd.grad(ref_out, inputs64, do.double()),
                torch.autograd.grad(lowp_out, lowp_inputs, do), do, ref_out, inputs64, 1 / math.sqrt(D))


def test_varlen_max_seqlen_hint_shorter_than_the_sequences():
    """The launchers size their grids by max_seqlen_q/k, which torch.compile cannot check: with a
    hint of 1 (one program per sequence and head) every kernel strides over the row and key
    blocks, and the results are those of the exact hint (outputs start as NaN: unwritten rows show)."""
    lens_q, lens_k = [37, 5, 50], [20, 61, 3]
    q, k, v, cu_q, cu_k = _packed_with_spare_rows(lens_q, lens_k, spare_q=0, spare_k=0, H=4)
    do = _randn(*q.shape, dtype=torch.float32)
    results = []
    for max_q, max_k in ((max(lens_q), max(lens_k)), (1, 1)):
        out, lse, stats = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=True)
        grads = run_bwd(do, q, k, v, out, stats, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=True)
        results.append((out, lse, *grads))
    _check_against_reference(*results[1][:2], results[1][2:], q, k, v, cu_q, cu_k, do)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} depends on the max_seqlen hint"


def test_varlen_top_left_causal():
    """causal_top_left in packed sequences, against a dense per-sequence reference."""
    lens_q, lens_k = [20, 9], [11, 33]
    H, D = 2, 32
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = _randn(sum(lens_q), H, D, dtype=torch.float32)
    k = _randn(sum(lens_k), H, D, dtype=torch.float32)
    v = _randn(sum(lens_k), H, D, dtype=torch.float32)
    out, lse, stats = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k), causal=True,
                       top_left=True)
    do = _randn(*q.shape, dtype=torch.float32)
    dq, dk, dv = run_bwd(do, q, k, v, out, stats, cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k),
                         causal=True, top_left=True)
    for b in range(2):
        sq, sk = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        inputs64 = [x[s].double().unsqueeze(0).requires_grad_() for x, s in ((q, sq), (k, sk), (v, sk))]
        allowed = _allowed_dense(1, lens_q[b], lens_k[b], True, True)
        ref_out, ref_lse = reference_dense(*inputs64, None, allowed, D**-0.5, torch.float64)
        torch.testing.assert_close(out[sq].double(), ref_out[0], atol=1e-6, rtol=1e-5)
        check_lse(lse[:, sq], ref_lse[0], f"lse of sequence {b}")
        ref_grads = torch.autograd.grad(ref_out, inputs64, do[sq].double().unsqueeze(0))
        for name, g, r in zip(("dq", "dk", "dv"), (dq[sq], dk[sk], dv[sk]), ref_grads):
            torch.testing.assert_close(g.double(), r[0], atol=2e-6, rtol=1e-5, msg=f"{name} of sequence {b}")


def _packed_with_spare_rows(lens_q, lens_k, spare_q, spare_k, lead_q=0, lead_k=0, H=2, D=32):
    """Packed q, k, v with rows that belong to no sequence: ``lead`` rows before cu_seqlens[0]
    and ``spare`` rows after cu_seqlens[-1] (what torch.compile lets through unchecked)."""
    cu_q = (torch.tensor([0] + lens_q, device=DEVICE).cumsum(0) + lead_q).to(torch.int32)
    cu_k = (torch.tensor([0] + lens_k, device=DEVICE).cumsum(0) + lead_k).to(torch.int32)
    q = _randn(lead_q + sum(lens_q) + spare_q, H, D, dtype=torch.float32)
    k = _randn(lead_k + sum(lens_k) + spare_k, H // 2, D, dtype=torch.float32)
    v = _randn(lead_k + sum(lens_k) + spare_k, H // 2, D, dtype=torch.float32)
    return q, k, v, cu_q, cu_k


def _check_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, do):
    """out, lse and (dq, dk, dv) against the float64 reference, which gives rows outside every
    sequence out 0, lse -inf and zero gradients; those must come out exactly so, not as garbage."""
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    lowp_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def ref(inputs, upcast=True):
        return reference.flash_attention(*inputs, causal=True, return_lse=True, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, upcast=upcast)

    ref_out, ref_lse = ref(inputs64)
    lowp_out, _ = ref(lowp_inputs, upcast=False)
    assert_close_2x(out, ref_out, lowp_out, "out")
    check_lse(lse, ref_lse, "lse")
    check_grads(grads, torch.autograd.grad(ref_out, inputs64, do.double()),
                torch.autograd.grad(lowp_out, lowp_inputs, do), do, ref_out, inputs64, 1 / math.sqrt(q.shape[-1]))
    dq, dk, dv = grads
    for what, x, cu in (("out", out, cu_q), ("dq", dq, cu_q), ("dk", dk, cu_k), ("dv", dv, cu_k)):
        spare = torch.cat([x[: cu[0]], x[cu[-1]:]])
        assert torch.equal(spare, torch.zeros_like(spare)), f"{what}: rows outside every sequence are not 0"
    assert torch.isneginf(torch.cat([lse[:, : cu_q[0]], lse[:, cu_q[-1]:]], 1)).all()


def test_varlen_rows_outside_every_sequence():
    """Packed rows before cu_seqlens[0] and after cu_seqlens[-1] (query and key side), more of
    them than max_seqlen covers: the launchers write out 0, lse -inf and zero dq/dk/dv there, and
    the sequences are unaffected."""
    lens_q, lens_k = [5, 0, 13], [9, 4, 21]
    q, k, v, cu_q, cu_k = _packed_with_spare_rows(lens_q, lens_k, spare_q=40, spare_k=35, lead_q=3, lead_k=2)
    max_q, max_k = max(lens_q), max(lens_k)  # tiles cover 16 rows: the 40 spare rows take 3 strides
    out, lse, stats = run_fwd(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=True)
    do = _randn(*q.shape, dtype=torch.float32)
    grads = run_bwd(do, q, k, v, out, stats, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, causal=True)
    _check_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, do)


def test_varlen_spare_rows_under_compile():
    """Under torch.compile lmkern.flash_attention skips its host check that cu_seqlens[-1] is the
    number of packed rows; the Triton backend still agrees with the reference on the rows past it
    (forward and backward, fresh outputs poisoned with NaN). aot_eager: the Triton op is opaque
    to Inductor on CPU tensors, so Inductor's codegen would add run time, not coverage."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = _packed_with_spare_rows([11, 6], [7, 20], spare_q=21, spare_k=5)

    def attend(q, k, v, cu_q, cu_k):
        return lmkern.flash_attention(q, k, v, causal=True, return_lse=True, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, backend="triton")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    do = _randn(*q.shape, dtype=torch.float32)
    with poisoned_empty():
        out, lse = compiled(*inputs, cu_q, cu_k)
        grads = torch.autograd.grad(out, inputs, do)
    _check_against_reference(out.detach(), lse.detach(), grads, q, k, v, cu_q, cu_k, do)


# ----------------------------------------------------------------------------- decode


# (B, Sq, Hq, Hkv, D, Smax, lengths, causal, num_splits, dtype)
DECODE = {
    "one_split_gqa": (3, 1, 4, 2, 64, 70, [0, 70, 33], True, 1, torch.float32),
    "three_splits_sq4_mqa": (2, 4, 4, 1, 32, 50, [50, 3], True, 3, torch.float32),
    "heuristic_splits_fp16": (2, 2, 6, 2, 80, 90, [61, 0], True, 0, torch.float16),
    "non_causal_many_splits": (2, 3, 2, 2, 32, 40, [40, 17], False, 5, torch.float32),
    "more_splits_than_blocks_fp16": (1, 1, 8, 2, 128, 20, [19], True, 4, torch.float16),
}


def test_nan_propagates_to_out_and_lse():
    """A NaN score makes the row's output and lse NaN (not -inf, which says "no key"), as in the
    reference; a NaN value makes the outputs of the rows that read it NaN and leaves lse finite.
    Forward and split-KV decode."""
    q, k, v = (_randn(1, S, 2, 32, dtype=torch.float32) for S in (20, 30, 30))
    q[0, 3, 1, 5] = float("nan")
    v[0, 11, 0, 2] = float("nan")
    out, lse, stats = run_fwd(q, k, v)
    ref_out, ref_lse = reference_dense(q, k, v, None, _allowed_dense(1, 20, 30, False, False), 32**-0.5,
                                       torch.float64)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
    assert lse[0, 1, 3].isnan() and torch.isfinite(lse[0, 0]).all()

    out = torch.full((1, 2, 2, 32), float("nan"), device=DEVICE)
    lse = torch.full((1, 2, 2), float("nan"), device=DEVICE)
    qd = q[:, 2:4].contiguous()  # query 1 holds the NaN
    kernels.attention_decode(qd, k, v, torch.tensor([30], dtype=torch.int32, device=DEVICE), False, 32**-0.5, 3,
                             out, lse)
    ref_out, ref_lse = reference_dense(qd, k, v, None, _allowed_dense(1, 2, 30, False, False), 32**-0.5,
                                       torch.float64)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
    assert lse[0, 1, 1].isnan()


def test_out_of_range_lengths_are_clamped():
    """Under torch.compile no host check reads cu_seqlens / cache_seqlens: the kernels clamp them
    into the tensors, never reading or writing outside, which gives what the clamped lengths give."""
    i32 = dict(dtype=torch.int32, device=DEVICE)
    q, k, v = _randn(12, 2, 32, dtype=torch.float32), _randn(10, 2, 32, dtype=torch.float32), _randn(10, 2, 32, dtype=torch.float32)
    bad = dict(cu_q=torch.tensor([0, 5, 20], **i32), cu_k=torch.tensor([-3, 4, 15], **i32), max_q=15, max_k=15)
    good = dict(cu_q=torch.tensor([0, 5, 12], **i32), cu_k=torch.tensor([0, 4, 10], **i32), max_q=7, max_k=6)
    got, want = run_fwd(q, k, v, causal=True, **bad), run_fwd(q, k, v, causal=True, **good)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    do = _randn(12, 2, 32, dtype=torch.float32)
    out, _, stats = want
    for a, b in zip(run_bwd(do, q, k, v, out, stats, causal=True, **bad), run_bwd(do, q, k, v, out, stats, causal=True, **good)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    qd, kc, vc = _randn(2, 1, 4, 32, dtype=torch.float32), _randn(2, 20, 2, 32, dtype=torch.float32), _randn(2, 20, 2, 32, dtype=torch.float32)
    res = []
    for lengths in ([25, -2], [20, 0]):
        out = torch.full(qd.shape, float("nan"), device=DEVICE)
        lse = torch.full((2, 4, 1), float("nan"), device=DEVICE)
        kernels.attention_decode(qd, kc, vc, torch.tensor(lengths, **i32), True, 32**-0.5, 2, out, lse)
        res.append((out, lse))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(DECODE))
def test_decode(case):
    check_decode(*DECODE[case])


def check_decode(B, Sq, Hq, Hkv, D, Smax, lengths, causal, num_splits, dtype, tile=None):
    q = _randn(B, Sq, Hq, D, dtype=dtype)
    k_cache = _randn(B, Smax, Hkv, D, dtype=dtype)
    v_cache = _randn(B, Smax, Hkv, D, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(lengths):  # never read
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, Hq, Sq), float("nan"), device=DEVICE)
    kernels.attention_decode(q, k_cache, v_cache, seqlens, causal, D**-0.5, num_splits, out, lse, tile=tile)

    keep = torch.arange(Smax, device=DEVICE).view(1, Smax, 1, 1) < seqlens.view(B, 1, 1, 1)
    kc, vc = (torch.where(keep, x, torch.zeros((), dtype=dtype, device=DEVICE)) for x in (k_cache, v_cache))
    allowed = _allowed_dense(B, Sq, Smax, causal, False, seqlens)
    ref_out, ref_lse = reference_dense(q, kc, vc, None, allowed, D**-0.5, torch.float64)
    lowp_out, _ = reference_dense(q, kc, vc, None, allowed, D**-0.5, dtype, upcast=False)
    assert_close_2x(out, ref_out, lowp_out, "out")
    check_lse(lse, ref_lse, "lse")
    # The public reference agrees (its own masking of the cache).
    torch.testing.assert_close(
        ref_out, reference.attention_with_kvcache(q.double(), k_cache.double(), v_cache.double(), seqlens, causal))
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.isneginf(lse[b]).all()


def _gpu_decode_tile_cases():
    """Every GPU autotune candidate of the split kernel (kernels.decode_tiles): each block shape
    once in the interpreter, every config on a GPU."""
    cases, seen = [], set()
    for dtype in (torch.float16, torch.float32):
        for D in (64, 128, 256):
            for t in kernels.decode_tiles(D, dtype, cpu=False):
                if DEVICE == "cpu" and (dtype, D, t.block_n) in seen:
                    continue
                seen.add((dtype, D, t.block_n))
                cases.append(pytest.param(D, dtype, t, id=f"D{D}-{str(dtype)[6:]}-" + "-".join(map(str, t))))
    return cases


@pytest.mark.parametrize("D, dtype, tile", _gpu_decode_tile_cases() if _ext.HAS_TRITON else [])
def test_every_gpu_decode_tile_config(D, dtype, tile):
    """The split kernel's candidate tiles against the reference: GQA with Sq = 2, a cache longer
    than two of the largest key blocks, an empty row, both the heuristic split count and a fixed one."""
    check_decode(3, 2, 4, 2, D, 300, [300, 0, 131], True, 0, dtype, tile=tile)
    check_decode(1, 1, 2, 1, D, 300, [257], False, 3, dtype, tile=tile)


def test_decode_heuristic_splits():
    """num_splits = 0 picks at least one split and never more than the key blocks."""
    q = torch.empty(2, 1, 8, 64)
    for smax in (1, 16, 100, 4096):
        n = kernels.decode_num_splits(q, torch.empty(2, smax, 2, 64), 16)
        assert 1 <= n <= max(1, math.ceil(smax / 16))
