"""Every attention kernel backend this installation can run (cpu, triton through the interpreter on
CPU; cuda and triton on a GPU), through the public functions, against the float64 reference.

Expected values: lmkern.reference.attention evaluated in float64 (its own tests pin it to
torch's float64 sdpa and to a row-by-row loop). Low precision follows the flash-attention rule:
the kernel's error is at most twice that of the same math done in the input dtype (the
reference with upcast=False) plus a rounding floor (tests/helpers.assert_close_2x). Gradients
are checked the same way against float64 autograd through the reference.
"""

from __future__ import annotations

import pytest
import torch

import lmkern
from lmkern.ops import attention as attention_ops
from lmkern.reference import attention as ref

from attention_helpers import grad_term_scale, packed
from helpers import assert_close_2x

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def dtypes_for(device: str, backend: str, head_dim: int = 64) -> list[torch.dtype]:
    """The dtypes ``backend`` runs on ``device`` (Triton's CPU interpreter computes bfloat16
    wrongly and the CUDA kernels take 16-bit inputs only: the dispatcher declines those)."""
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
        if lmkern.dispatch.reasons("flash_attention", attention_ops.attention_spec(t, t, t))[backend] is None:
            out.append(dtype)
    return out


_DEFAULT_DTYPE = [torch.float32]  # what rand() draws unless told: the backend's first dtype


@pytest.fixture
def kb(kernel_device_backend):
    """(device, backend) of one attention kernel backend; skips backends this build lacks for
    attention (their reasons are asserted in test_kernel_backends_are_present)."""
    device, backend = kernel_device_backend
    dtypes = dtypes_for(device, backend)
    if not dtypes:
        spec = attention_ops.attention_spec(*(torch.empty(1, 1, 1, 64, device=device),) * 3)
        pytest.skip(f"{backend} attention on {device}: {lmkern.dispatch.reasons('flash_attention', spec)[backend]}")
    _DEFAULT_DTYPE[0] = dtypes[0]
    yield device, backend
    _DEFAULT_DTYPE[0] = torch.float32


def interpreted(kb) -> bool:
    return kb == ("cpu", "triton")


def only_some_when_interpreted(kb, case, cases) -> None:
    """Triton's CPU interpreter takes 10-30 s per case here: on it, a test's grid shrinks to
    ``cases`` (each feature still runs; tests/test_attention_triton.py drives the launchers
    through multi-block paths directly), and CUDA runs the whole grid."""
    if interpreted(kb) and case not in cases:
        pytest.skip("Triton interpreter: a smaller grid of this test runs (every case runs on CUDA)")


def test_kernel_backends_are_present():
    """The backends CI requires (LMKERN_REQUIRE_BACKENDS) run attention on CPU tensors."""
    import os

    required = [b for b in os.environ.get("LMKERN_REQUIRE_BACKENDS", "").split(",") if b in ("cpu", "triton")]
    spec = attention_ops.attention_spec(*(torch.empty(1, 1, 1, 64),) * 3)
    why = lmkern.dispatch.reasons("flash_attention", spec)
    for b in required:
        assert why[b] is None, f"{b}: {why[b]}"


def rand(*shape, dtype=None, device="cpu", grad=False):
    return torch.randn(*shape, device=device).to(dtype or _DEFAULT_DTYPE[0]).requires_grad_(grad)


def check(out, expect64, lowp, what):
    """``out`` against the float64 ``expect64``: the 2x rule against ``lowp`` (the same math in
    out's dtype)."""
    assert out.dtype == lowp.dtype, what
    assert_close_2x(out.cpu(), expect64.cpu(), lowp.cpu(), what)


def run_and_grads(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients of <out, grad_out> with respect to inputs."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads, grad_out


def compare(fn_kernel, fn_ref, inputs, what, backward=True):
    """fn_kernel on ``inputs`` against fn_ref(upcast) in float64 and in the inputs' dtype
    (forward, and every input gradient when ``backward``)."""
    dt = inputs[0].dtype
    x64 = [t.detach().double().requires_grad_(backward) for t in inputs]
    xlp = [t.detach().requires_grad_(backward) for t in inputs]
    xk = [t.detach().requires_grad_(backward) for t in inputs]
    if not backward:
        out = fn_kernel(*xk)
        check(out, fn_ref(*x64, upcast=True), fn_ref(*xlp, upcast=False), what)
        return out
    out, grads, g = run_and_grads(fn_kernel, xk)
    out64, grads64, _ = run_and_grads(lambda *a: fn_ref(*a, upcast=True), x64, g.double())
    outlp, gradslp, _ = run_and_grads(lambda *a: fn_ref(*a, upcast=False), xlp, g)
    check(out, out64, outlp, what)
    terms = grad_term_scale(g, *x64)  # float32 rounds terms of this size whatever the order
    for name, gk, g64, glp in zip("qkv", grads, grads64, gradslp):
        assert_close_2x(gk.cpu(), g64.cpu(), glp.cpu(), f"{what} d{name}", term_scale=terms)
    return out


# ----------------------------------------------------------------------------- sdpa


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S", [(1, 1), (1, 97), (97, 1), (33, 70), (70, 33)])
def test_sdpa(kb, causal, L, S):
    only_some_when_interpreted(kb, (causal, L, S), {(True, 33, 70), (False, 97, 1)})
    device, backend = kb
    for dtype in dtypes_for(device, backend):
        q, k, v = (rand(2, 3, n, 32, dtype=dtype, device=device) for n in (L, S, S))
        compare(
            lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend),
            lambda q, k, v, upcast: ref.sdpa(q, k, v, is_causal=causal, upcast=upcast),
            [q, k, v], f"{backend} sdpa {dtype} L={L} S={S} causal={causal}",
            backward=True,
        )


@pytest.mark.parametrize("hq, hkv", [(8, 2), (6, 1)])
def test_sdpa_gqa(kb, hq, hkv):
    only_some_when_interpreted(kb, (hq, hkv), {(8, 2)})
    device, backend = kb
    q, k, v = rand(2, hq, 17, 64, device=device), rand(2, hkv, 23, 64, device=device), rand(2, hkv, 23, 64, device=device)
    compare(
        lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend),
        lambda q, k, v, upcast: ref.sdpa(q, k, v, is_causal=True, enable_gqa=True, upcast=upcast),
        [q, k, v], f"{backend} sdpa gqa {hq}/{hkv}",
    )


@pytest.mark.parametrize("mask_shape", [(7, 11), (1, 11), (7, 1), (3, 1, 11), (2, 3, 7, 11), (2, 1, 1, 11)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_broadcast(kb, mask_shape, kind):
    only_some_when_interpreted(kb, (mask_shape, kind), {((2, 1, 1, 11), "bool"), ((7, 1), "float"), ((2, 3, 7, 11), "float")})
    device, backend = kb
    q, k, v = rand(2, 3, 7, 32, device=device), rand(2, 3, 11, 32, device=device), rand(2, 3, 11, 32, device=device)
    if kind == "bool":
        mask = torch.rand(mask_shape, device=device) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(mask_shape, device=device) * 2
        mask[torch.rand(mask_shape, device=device) > 0.8] = float("-inf")
        mask[..., 0] = 0.0
    compare(
        lambda q, k, v: lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend),
        lambda q, k, v, upcast: ref.sdpa(q, k, v, attn_mask=mask if kind == "bool" or not upcast else mask.double(), upcast=upcast),
        [q, k, v], f"{backend} sdpa mask {kind} {mask_shape}",
    )


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_are_zero_with_zero_grad(kb, kind):
    device, backend = kb
    q, k, v = (rand(2, 2, 6, 32, device=device, grad=True) for _ in range(3))
    if kind == "bool":
        mask = torch.rand(6, 6, device=device) > 0.5
        mask[2] = False
        mask[[0, 1, 3, 4, 5], 0] = True
    else:
        mask = torch.randn(6, 6, device=device)
        mask[2] = float("-inf")
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (q.grad[:, :, 2] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_sdpa_three_dims_extra_batch_dims_and_empty(kb):
    device, backend = kb
    for shape_q, shape_k in [((3, 5, 32), (3, 7, 32)), ((2, 2, 3, 5, 32), (2, 2, 3, 7, 32)), ((0, 3, 5, 32), (0, 3, 7, 32))]:
        q, k, v = rand(*shape_q, device=device), rand(*shape_k, device=device), rand(*shape_k, device=device)
        out = lmkern.scaled_dot_product_attention(q, k, v, backend=backend)
        check(out, ref.sdpa(q.double(), k.double(), v.double()), ref.sdpa(q, k, v, upcast=False), f"{backend} {shape_q}")


@pytest.mark.parametrize("lead", [(), (2,), (2, 2)], ids=["3d", "4d", "5d"])
@pytest.mark.parametrize("L, S", [(0, 7), (5, 0), (0, 0)])
def test_sdpa_empty_sequences(kb, lead, L, S):
    # no queries or no keys, with and without a mask, any number of batch dims: torch's shapes and
    # values (rows without keys are 0) and empty or zero gradients
    device, backend = kb
    q, k, v = rand(*lead, 3, L, 16, device=device, grad=True), rand(*lead, 3, S, 16, device=device, grad=True), rand(*lead, 3, S, 16, device=device, grad=True)
    for mask in (None, torch.zeros(L, S, device=device), torch.ones(*lead, 1, L, S, dtype=torch.bool, device=device)):
        out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        assert torch.equal(out, torch.zeros_like(q)), f"{backend} {lead} {L} {S}"
        for g, x in zip(torch.autograd.grad(out.sum(), (q, k, v)), (q, k, v)):
            assert g.shape == x.shape and (g == 0).all()


def test_sdpa_noncontiguous(kb):
    device, backend = kb
    q = rand(2, 9, 3, 64, device=device).transpose(1, 2)  # (B, H, S, D) with strided heads
    k = rand(2, 3, 11, 128, device=device)[..., ::2]  # non-unit last stride
    v = rand(11, 3, 2, 64, device=device).permute(2, 1, 0, 3)
    out = lmkern.scaled_dot_product_attention(q, k, v, backend=backend)
    check(out, ref.sdpa(q.double(), k.double(), v.double()), ref.sdpa(q, k, v, upcast=False), f"{backend} strided")


def test_empty_keys_with_a_strided_head_dim(kb):
    # zero keys given as a view with last-dim stride 2: an empty tensor counts as contiguous, so
    # making it unit-stride needs fresh storage, not contiguous(); every query row attends nothing
    device, backend = kb
    q = rand(2, 3, 4, 32, device=device)
    k = rand(2, 3, 0, 64, device=device)[..., ::2]
    v = rand(2, 3, 0, 64, device=device)[..., ::2]
    out = lmkern.scaled_dot_product_attention(q, k, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(q))
    out = lmkern.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend)
    assert torch.equal(out, torch.zeros_like(q.transpose(1, 2)))
    cu_q = torch.tensor([0, 4], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 0], dtype=torch.int32, device=device)
    out = lmkern.flash_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    assert torch.equal(out, torch.zeros(4, 3, 32, dtype=q.dtype, device=device))


def test_empty_strided_inputs_stay_in_the_autograd_graph(kb):
    # no queries (or no keys) given as views with last-dim stride 2: their unit-stride copies must
    # keep the autograd link, so that the gradients (empty, or zeros) reach them
    device, backend = kb
    for nq, nk in ((0, 5), (6, 0)):
        q = rand(nq, 2, 64, device=device)[..., ::2].requires_grad_()
        k, v = (rand(nk, 1, 64, device=device)[..., ::2].requires_grad_() for _ in range(2))
        cu_q = torch.tensor([0, nq], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, nk], dtype=torch.int32, device=device)
        out = lmkern.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        for g, x in zip(torch.autograd.grad(out.sum(), (q, k, v)), (q, k, v)):
            assert g.shape == x.shape and (g == 0).all()


def test_float32_min_mask_rows_attend_uniformly(kb):
    # Hugging Face masks with float32's min, not -inf: a row of only that value attends its keys
    # uniformly in torch; the kernels' log2-domain scores must not overflow it into "no key"
    device, backend = kb
    q, k, v = (rand(1, 2, n, 16, device=device, grad=True) for n in (6, 7, 7))
    mask = torch.randn(6, 7, device=device)
    mask[:2] = torch.finfo(torch.float32).min
    mask[2, ::2] = torch.finfo(torch.float32).min
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[..., :2, :].double(), v64.mean(-2, keepdim=True).expand(1, 2, 2, 16), rtol=1e-4, atol=1e-4)
    # gradients as Hugging Face trains: its loss ignores the padded rows (no gradient arrives there)
    g = torch.randn_like(want)
    g[..., :2, :] = 0
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(want, (q64, k64, v64), g)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-3, atol=1e-3)


def test_float32_min_mask_rows_gradient(kb):
    # A gradient arriving at a row whose every score is near float32's min. The forward there is
    # uniform (the scores' q.k part is lost to rounding), so dv = g / (keys) for each key, which
    # the float64 reference's autograd gives. At that magnitude lse = max + log(row sum) rounds
    # to max: a backward recomputing P = exp(s - lse) gets probabilities summing to the row length
    # (torch's own sdpa backward does: its dv is `keys` times too large). The kernels keep max and
    # log-sum apart for their backward.
    device, backend = kb
    q, k, v = (rand(1, 1, n, 16, device=device, grad=True) for n in (3, 5, 5))
    mask = torch.full((3, 5), torch.finfo(torch.float32).min, device=device)
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.sdpa(q64, k64, v64, attn_mask=mask.double())
    g = torch.randn_like(want)
    (dv64,) = torch.autograd.grad(want, v64, g, retain_graph=True)
    torch.testing.assert_close(dv64, g.sum(-2, keepdim=True).expand(1, 1, 5, 16) / 5)  # the reference is right
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(want, (q64, k64, v64), g)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4)


def test_float32_min_mask_rows_with_large_scores_and_no_gradient_there(kb):
    # Hugging Face's case: padded query rows (all float32's min) receive no gradient, and the other
    # rows' scores are large (> 88, where exp overflows float32). A backward that recomputes those
    # rows' P as exp(s - lse) gets exp(q.k * scale) there (lse has lost it): inf, and inf * 0 = NaN
    # in dq and in every key's dk and dv.
    device, backend = kb
    q, k, v = (rand(1, 2, n, 16, device=device) for n in (4, 6, 6))
    q = (q + 6.0).requires_grad_()  # scores ~ 16 * 36 / 4 = 144, well past 88
    k = (k + 6.0).requires_grad_()
    v.requires_grad_()
    mask = torch.zeros(4, 6, device=device)
    mask[0] = torch.finfo(torch.float32).min
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.sdpa(q64, k64, v64, attn_mask=mask.double())
    g = torch.randn_like(want)
    g[..., 0, :] = 0
    # When the rows' scores are many units apart the softmax is nearly one-hot and dq, dk cancel
    # down to ~1e-4 from terms of size ~10 (grad_term_scale): float32 (torch's own too) is then
    # off by ~1e-6, over 1e-3 of the result (about 1 seed in 200 failed). Floor: 8 float32 ulp of
    # the terms, as in helpers.assert_close_2x.
    floor = 8 * torch.finfo(torch.float32).eps * grad_term_scale(g, q64, k64, v64)
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(want, (q64, k64, v64), g)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp, rtol=1e-3, atol=1e-3 * exp.abs().max().item() + floor)


def test_large_negative_mask_rows_gradient(kb):
    # Rows whose visible scores all sit near -1e9 (a common masking value): in float32 the q.k
    # part and log(row sum) are both lost to the ulp there (64), so these rows attend uniformly,
    # and lse alone cannot give back their probabilities. Against the float32 reference's
    # autograd (float64 would keep the q.k part).
    device, backend = kb
    q, k, v = (rand(2, 3, n, 32, device=device, grad=True) for n in (6, 9, 9))
    mask = torch.randn(2, 3, 6, 9, device=device)
    mask[:, :, :3] = -1e9 + torch.randn(2, 3, 3, 9, device=device)  # whole rows near -1e9
    mask[:, 1, 4, ::3] = float("-inf")
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    q32, k32, v32 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = ref.sdpa(q32, k32, v32, attn_mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q32, k32, v32), g)):
        torch.testing.assert_close(got, exp, rtol=2e-4, atol=2e-4)


def test_blockwise_backward_at_float32_min_rows():
    # The blockwise backward (cuda's, and the path of a gradient through the lse) at rows of
    # float32-min scores, called directly: dv = g / keys for each key, as the float64 reference.
    q, k, v = (rand(1, n, 2, 16, grad=True) for n in (3, 5, 5))
    bias = torch.full((1, 2, 3, 5), torch.finfo(torch.float32).min)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref.sdpa(*(t.transpose(1, 2) for t in (q64, k64, v64)), attn_mask=bias.double(), scale=0.25).transpose(1, 2)
    g = torch.randn_like(want)
    got = torch.ops.lmkern.attention_bwd_blockwise(g.float(), None, q, k, v, want.float(), bias, None, None, None,
                                                   False, False, 0.25)
    for a, b in zip(got, torch.autograd.grad(want, (q64, k64, v64), g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_double_backward_raises_instead_of_a_wrong_answer(kb):
    # the kernels' backward has no derivative: a gradient of a gradient must fail loudly (the
    # C++ one used to be taken for constant, with only a warning)
    device, backend = kb
    q, k, v = (rand(1, 2, 5, 16, device=device, grad=True) for _ in range(3))
    out = lmkern.scaled_dot_product_attention(q, k, v, backend=backend)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_bwd"):
        gq.pow(2).sum().backward()


def test_index_tensors_given_as_views(kb):
    # cache_seqlens expanded from one value (stride 0) and cu_seqlens as strided views: the same
    # answers as their contiguous copies (the kernels index them as plain arrays)
    device, backend = kb
    q, kc, vc = rand(3, 1, 2, 16, device=device), rand(3, 20, 2, 16, device=device), rand(3, 20, 2, 16, device=device)
    lens = torch.tensor([7], dtype=torch.int32, device=device).expand(3)
    got = lmkern.attention_with_kvcache(q, kc, vc, lens, backend=backend)
    assert torch.equal(got, lmkern.attention_with_kvcache(q, kc, vc, lens.contiguous(), backend=backend))
    qp, kp, vp = (rand(n, 2, 16, device=device, grad=True) for n in (10, 12, 12))
    cu_q = torch.tensor([0, -1, 4, -1, 10], dtype=torch.int32, device=device)[::2]
    cu_k = torch.tensor([0, 7, 3, 7, 12], dtype=torch.int32, device=device)[::2]
    outs = [lmkern.flash_attention(qp, kp, vp, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, backend=backend)
            for cq, ck in ((cu_q, cu_k), (cu_q.contiguous(), cu_k.contiguous()))]
    assert torch.equal(outs[0], outs[1])
    g = torch.randn_like(outs[0])
    for a, b in zip(torch.autograd.grad(outs[0], (qp, kp, vp), g), torch.autograd.grad(outs[1], (qp, kp, vp), g)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- flash_attention


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_flash_head_dims(kb, D):
    only_some_when_interpreted(kb, D, {32, 80, 256})
    device, backend = kb
    for dtype in dtypes_for(device, backend):
        q = rand(1, 19, 4, D, dtype=dtype, device=device)
        k, v = rand(1, 31, 2, D, dtype=dtype, device=device), rand(1, 31, 2, D, dtype=dtype, device=device)
        out, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
        e64, lse64 = ref.flash_attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
        check(out, e64, ref.flash_attention(q, k, v, causal=True, upcast=False), f"{backend} D={D} {dtype}")
        assert lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("Sq, Sk", [(1, 1), (1, 97), (97, 1), (33, 97), (97, 33), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 1)])
def test_flash_dense(kb, Sq, Sk, causal, hq, hkv):
    only_some_when_interpreted(kb, (Sq, Sk, causal, hq, hkv), {(97, 33, True, 4, 1), (1, 97, False, 4, 4), (64, 64, True, 4, 4)})
    device, backend = kb
    dtypes = dtypes_for(device, backend)
    dtype = dtypes[(Sq + Sk) % len(dtypes)]  # every dtype over the grid
    q = rand(2, Sq, hq, 32, dtype=dtype, device=device)
    k, v = rand(2, Sk, hkv, 32, dtype=dtype, device=device), rand(2, Sk, hkv, 32, dtype=dtype, device=device)
    compare(
        lambda q, k, v: lmkern.flash_attention(q, k, v, causal=causal, backend=backend),
        lambda q, k, v, upcast: ref.flash_attention(q, k, v, causal=causal, upcast=upcast),
        [q, k, v], f"{backend} flash {dtype} Sq={Sq} Sk={Sk} causal={causal} {hq}/{hkv}",
    )


def test_flash_long_sequence(kb):
    """Crosses many key and query tiles, with causal block skipping."""
    device, backend = kb
    S = 160 if interpreted(kb) else 1025
    q, k, v = (rand(1, S, 2, 64, device=device) for _ in range(3))
    compare(
        lambda q, k, v: lmkern.flash_attention(q, k, v, causal=True, backend=backend),
        lambda q, k, v, upcast: ref.flash_attention(q, k, v, causal=True, upcast=upcast),
        [q, k, v], f"{backend} long S={S}",
    )


def test_flash_lse_gradient_and_fully_masked_rows(kb):
    device, backend = kb
    q = rand(1, 7, 2, 32, device=device, grad=True)
    k, v = rand(1, 3, 2, 32, device=device, grad=True), rand(1, 3, 2, 32, device=device, grad=True)
    out, lse = lmkern.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert (out[0, :4] == 0).all() and torch.isneginf(lse[0, :, :4]).all() and torch.isfinite(lse[0, :, 4:]).all()
    w = torch.randn_like(lse[..., 4:])
    gk = torch.autograd.grad(out.sum() + (lse[..., 4:] * w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = ref.flash_attention(q64, k64, v64, causal=True, return_lse=True)
    g64 = torch.autograd.grad(o64.sum() + (l64[..., 4:] * w.double()).sum(), (q64, k64, v64))
    tol = 2e-5 if q.dtype == torch.float32 else 2e-2  # 16-bit gradients round to ~1e-3 relative
    for a, b in zip(gk, g64):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
    assert (gk[0][0, :4] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
def test_flash_varlen(kb, causal, hq, hkv):
    only_some_when_interpreted(kb, (causal, hq, hkv), {(True, 6, 2)})
    device, backend = kb
    lens_q, lens_k = [1, 70, 0, 13, 40], [5, 70, 3, 1, 64]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, hq, hkv, 64)
    q, k, v, cu_q, cu_k = (t.to(device) for t in (q, k, v, cu_q, cu_k))
    compare(
        lambda q, k, v: lmkern.flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=70, max_seqlen_k=70, backend=backend),
        lambda q, k, v, upcast: ref.flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, upcast=upcast),
        [q, k, v], f"{backend} varlen causal={causal} {hq}/{hkv}",
    )
    _, lse = lmkern.flash_attention(q, k, v, causal=causal, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    _, e = ref.flash_attention(q.double(), k.double(), v.double(), causal=causal, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (hq, q.shape[0])
    torch.testing.assert_close(lse.double(), e, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- kv cache


@pytest.mark.parametrize("Sq", [1, 4])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_kvcache(kb, Sq, hq, hkv, num_splits):
    only_some_when_interpreted(kb, (Sq, hq, hkv, num_splits), {(1, 8, 2, 3), (4, 4, 1, 0), (1, 4, 4, 1)})
    device, backend = kb
    B, Smax, D = 4, 97, 64
    for dtype in dtypes_for(device, backend)[:2]:
        q = rand(B, Sq, hq, D, dtype=dtype, device=device)
        kc, vc = rand(B, Smax, hkv, D, dtype=dtype, device=device), rand(B, Smax, hkv, D, dtype=dtype, device=device)
        lens = torch.tensor([97, 1, 0, 50], dtype=torch.int32, device=device)
        kc[1, 1:] = float("nan")  # never read: slots past the prefix
        vc[1, 1:] = float("nan")
        kc[2] = float("nan")
        out = lmkern.attention_with_kvcache(q, kc, vc, lens, causal=True, num_splits=num_splits, backend=backend)
        e64 = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens)
        lowp = ref.attention_with_kvcache(q, kc, vc, lens, upcast=False)
        check(out, e64, lowp, f"{backend} kvcache Sq={Sq} {hq}/{hkv} splits={num_splits} {dtype}")
        assert (out[2] == 0).all()


def test_kvcache_gradients(kb):
    device, backend = kb
    lens = torch.tensor([9, 3], dtype=torch.int32, device=device)
    q, kc, vc = rand(2, 3, 4, 32, device=device), rand(2, 12, 2, 32, device=device), rand(2, 12, 2, 32, device=device)
    compare(
        lambda q, kc, vc: lmkern.attention_with_kvcache(q, kc, vc, lens, backend=backend),
        lambda q, kc, vc, upcast: ref.attention_with_kvcache(q, kc, vc, lens, upcast=upcast),
        [q, kc, vc], f"{backend} kvcache grads",
    )


# ----------------------------------------------------------------------------- dispatch, ops, compile


def test_kernels_decline_what_the_reference_does(kb):
    device, backend = kb
    q = rand(1, 2, 5, 32, device=device)
    cases = [
        (dict(dropout_p=0.5), "dropout"),
        (dict(attn_mask=torch.zeros(5, 5, device=device, requires_grad=True)), "attn_mask requires grad"),
    ]
    for kw, reason in cases:
        with pytest.raises(lmkern.BackendError, match=reason):
            lmkern.scaled_dot_product_attention(q, q, q, backend=backend, **kw)
    with pytest.raises(lmkern.BackendError, match="float64"):
        lmkern.scaled_dot_product_attention(q.double(), q.double(), q.double(), backend=backend)
    with pytest.raises(lmkern.BackendError, match="value's head dim"):
        lmkern.scaled_dot_product_attention(q, q, rand(1, 2, 5, 16, device=device), backend=backend)
    # auto falls back to the reference for them
    out = lmkern.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(5, 5, device=device, requires_grad=True))
    torch.testing.assert_close(out, ref.sdpa(q, q, q))


def test_auto_picks_the_cpu_kernel_on_cpu():
    spec = attention_ops.attention_spec(*(torch.empty(1, 4, 2, 64),) * 3)
    name, _ = lmkern.dispatch.select("flash_attention", None, spec)
    assert name == ("cpu" if attention_ops.CPP_KERNELS[("attention_fwd", "CPU")] else "reference")


def _kernel_op_cases(device, backend):
    fwd = torch.ops.lmkern.attention_fwd if backend in ("cpu", "cuda") else torch.ops.lmkern.attention_fwd_triton
    q, k, v = (rand(2, 9, 4, 32, device=device, grad=True) for _ in range(3))
    qp, kp, vp, cu_q, cu_k = (t.to(device) for t in packed([3, 6], [5, 4], 4, 2, 32))
    bias = torch.randn(9, 9, device=device).expand(2, 4, 9, 9)
    lens = torch.tensor([4, 9], dtype=torch.int32, device=device)
    return fwd, [
        (q, k, v, None, None, None, None, 9, 9, True, False, 0.3),
        (q, k, v, bias, None, None, None, 9, 9, False, True, 0.2),
        (q, k, v, None, None, None, lens, 9, 9, True, False, 0.2),
        (qp.requires_grad_(), kp.requires_grad_(), vp.requires_grad_(), None, cu_q, cu_k, None, 6, 5, True, False, 0.2),
    ]


def test_opcheck_kernel_ops(kb):
    device, backend = kb
    fwd, cases = _kernel_op_cases(device, backend)
    for args in (cases[0], cases[3]) if interpreted(kb) else cases:
        torch.library.opcheck(fwd, args)


def test_opcheck_blockwise_backward():
    q, k, v = (rand(2, 9, 4, 32) for _ in range(3))
    out, lse = ref.flash_attention(q, k, v, causal=True, return_lse=True)
    g = torch.randn_like(out)
    for grad_lse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.lmkern.attention_bwd_blockwise, (g, grad_lse, q, k, v, out, None, None, None, None, True, False, 0.2)
        )


def test_blockwise_backward_in_small_blocks(monkeypatch):
    """The CPU/CUDA backward walks query rows in blocks; force many tiny blocks."""
    monkeypatch.setattr(attention_ops, "BLOCKWISE_SCORE_BUDGET", 1)
    q, k, v = rand(2, 13, 4, 16), rand(2, 17, 2, 16), rand(2, 17, 2, 16)
    bias = torch.randn(13, 17).expand(2, 4, 13, 17)
    lens = torch.tensor([17, 5], dtype=torch.int32)
    for causal, top_left, b, used in [(True, False, None, None), (True, True, bias, None), (False, False, None, lens)]:
        x64 = [t.double().requires_grad_() for t in (q, k, v)]

        def ref_fn(q, k, v):
            mask = torch.ones(13, 17, dtype=torch.bool)
            if causal:
                mask = torch.ones(13, 17, dtype=torch.bool).tril(0 if top_left else 17 - 13)
            allowed = mask.expand(2, 4, 13, 17).clone()
            if used is not None:
                allowed &= torch.arange(17)[None, None, None, :] < used.long()[:, None, None, None]
            kk, vv = ref._expand_kv_heads(k.transpose(1, 2), v.transpose(1, 2), 4, 1)
            o, l = ref.attention_core(q.transpose(1, 2), kk, vv, 0.25, allowed, None if b is None else b.double())
            return o.transpose(1, 2), l

        o64, l64 = ref_fn(*x64)
        g = torch.randn_like(o64)
        e = torch.autograd.grad((o64 * g).sum(), x64)
        dq, dk, dv = torch.ops.lmkern.attention_bwd_blockwise(
            g.float(), None, q, k, v, o64.float(), b, None, None, used, causal, top_left, 0.25
        )
        for a, x in zip((dq, dk, dv), e):
            torch.testing.assert_close(a.double(), x, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph(kb):
    device, backend = kb
    torch._dynamo.reset()
    q, k, v = (rand(2, 9, 4, 32, device=device, grad=True) for _ in range(3))

    def f(q, k, v):
        return lmkern.flash_attention(q, k, v, causal=True, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    e = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
    for a, b in zip(g, e):
        torch.testing.assert_close(a, b)


def test_compile_varlen_short_max_seqlen_hint(kb):
    """Under torch.compile flash_attention cannot check max_seqlen_q/k against cu_seqlens (that
    reads the device tensors): a hint shorter than the longest sequence must cost time only,
    never rows (forward, lse and gradients against the eager call with a correct hint)."""
    device, backend = kb
    torch._dynamo.reset()
    lens_q, lens_k = [45, 3, 70], [33, 70, 12]
    q, k, v, cu_q, cu_k = (t.to(device) for t in packed(lens_q, lens_k, 4, 2, 32))

    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        return lmkern.flash_attention(q, k, v, causal=True, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = compiled(*xs, cu_q, cu_k, 1, 5)
    e_xs = [t.detach().requires_grad_() for t in (q, k, v)]
    e_out, e_lse = f(*e_xs, cu_q, cu_k, max(lens_q), max(lens_k))
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(lse, e_lse)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, xs, g), torch.autograd.grad(e_out, e_xs, g)):
        torch.testing.assert_close(a, b)
