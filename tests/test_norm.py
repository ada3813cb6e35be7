"""LayerNorm / RMSNorm on every backend this installation has, against a float64 reference.

Each test draws fresh random inputs (seeded per run, see conftest.py) and compares forward
outputs and every gradient with lmkern.reference run in float64, using the 2x rule of
helpers.assert_close_2x against the same reference run in the input's precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_2x, poisoned_empty

import lmkern
from lmkern import _ext, dispatch

SIZES = [1, 3, 97, 127, 1025, 4097, 65536]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["layer_norm", "rms_norm"]
# weight/bias/residual/offset combinations; "fp32_affine" keeps weight and bias in float32 while the
# activations are low precision (mixed-precision training).
CONFIGS = ["plain", "affine", "fp32_affine", "residual", "offset"]


def _refuses(device: str, backend: str, dtype: torch.dtype) -> str | None:
    """The documented dtype limits: the reason a backend must decline, or None if it must run."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return "interpreter"
    return None


def make_inputs(op: str, config: str, m: int, n: int, dtype, device):
    """Random inputs with a nonzero mean (exercises LayerNorm's centering) and weights near 1."""
    x = (torch.randn(m, n, dtype=torch.float32) * 2 + 0.5).to(device=device, dtype=dtype)
    affine_dtype = torch.float32 if config == "fp32_affine" else dtype
    weight = bias = residual = None
    offset = 0.0
    if config != "plain":
        weight = (torch.randn(n) * 0.2 + 1).to(device=device, dtype=affine_dtype)
        if op == "layer_norm":
            bias = torch.randn(n).to(device=device, dtype=affine_dtype)
    if config == "residual":
        residual = torch.randn(m, n).to(device=device, dtype=dtype)
    if config == "offset":
        weight = (torch.randn(n) * 0.2).to(device=device, dtype=dtype)  # Gemma: (1 + w), w near 0
        offset = 1.0
    return x, weight, bias, residual, offset


def call(op, x, weight, bias, residual, offset, backend, eps=1e-5):
    kwargs = dict(residual=residual, weight_offset=offset, backend=backend)
    n = x.shape[-1]
    if op == "layer_norm":
        return lmkern.layer_norm(x, (n,), weight, bias, eps, **kwargs)
    return lmkern.rms_norm(x, (n,), weight, eps, **kwargs)


def run_with_grads(op, inputs, backend, upstream):
    """Forward (out, residual_out or None) and the gradients of sum(out * g + residual_out * g2)."""
    x, weight, bias, residual, offset = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    res = call(op, leaves[0], leaves[1], leaves[2], leaves[3], offset, backend)
    outs = list(res) if residual is not None else [res]
    grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], upstream[: len(outs)])
    named = iter(grads)
    grad_by_name = {name: next(named) for name, t in zip(("x", "weight", "bias", "residual"), leaves) if t is not None}
    return [o.detach() for o in outs], grad_by_name


def grad_term_scales(op, inputs64, grad_out64, eps=1e-5) -> dict[str, float]:
    """For each gradient, the size of the terms its float32 computation rounds and cancels (see
    helpers.assert_close_2x): a kernel's rounding error is a few ulp of this, whatever torch's own
    error happens to be.

    * dx (and dresidual = dx + ...): rstd * |g * w|, the size of each term of
      dx = rstd * (g*w - projections); LayerNorm also centers h, which loses |h| * rstd of relative
      precision in xhat when the mean dwarfs the spread (tiny rows, n = 1 or 3).
    * dweight, dbias: sums over rows of |g * xhat| and |g|."""
    x, weight, _, residual, offset = inputs64
    h = x if residual is None else x + residual
    centered = h - h.mean(-1, keepdim=True) if op == "layer_norm" else h
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    w = (weight + offset) if weight is not None else 1.0
    amplification = (h.abs().amax(-1, keepdim=True) * rstd).clamp(min=1.0) if op == "layer_norm" else 1.0
    dx = (rstd * amplification * (grad_out64 * w).abs()).max().item()
    return {
        "x": dx,
        "residual": dx,
        "weight": (grad_out64 * centered * rstd).abs().sum(0).max().item(),
        "bias": grad_out64.abs().sum(0).max().item(),
    }


def to64(inputs):
    x, weight, bias, residual, offset = inputs
    d = [t.double() if t is not None else None for t in (x, weight, bias, residual)]
    return (*d, offset)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(device_backend, op, dtype, n, config):
    device, backend = device_backend
    m = 3 if n >= 65536 else 37
    inputs = make_inputs(op, config, m, n, dtype, device)
    if _refuses(device, backend, dtype):
        with pytest.raises(dispatch.BackendError, match=backend):
            call(op, *inputs, backend=backend)
        return
    upstream = [torch.randn(m, n, device=device).to(dtype) for _ in range(2)]
    with poisoned_empty():
        outs, grads = run_with_grads(op, inputs, backend, upstream)
    outs64, grads64 = run_with_grads(op, to64(inputs), "reference", [g.double() for g in upstream])
    outs_lp, grads_lp = run_with_grads(op, inputs, "reference", upstream)
    for name, o, r, lp in zip(("out", "residual_out"), outs, outs64, outs_lp):
        assert_close_2x(o, r, lp, f"{backend} {op} {name}")
    assert grads.keys() == grads64.keys()
    terms = grad_term_scales(op, to64(inputs), upstream[0].double())
    for name in grads:
        assert_close_2x(grads[name], grads64[name], grads_lp[name], f"{backend} {op} d{name}", terms[name])


@pytest.mark.parametrize("op", OPS)
def test_statistics_are_float32(device_backend, op):
    device, backend = device_backend
    dtype = torch.float16
    x = torch.randn(4, 64, device=device, dtype=dtype) * 30 + 100  # outside fp16's precise range
    fwd = dispatch.implementation(op, backend)
    if op == "layer_norm":
        out, _, mean, rstd = fwd(x, None, None, None, 1e-5, 0.0)
        assert mean.dtype == torch.float32
        torch.testing.assert_close(mean, x.float().mean(-1), rtol=1e-6, atol=1e-4)
    else:
        out, _, rstd = fwd(x, None, None, 1e-5, 0.0)
    assert rstd.dtype == torch.float32 and out.dtype == dtype


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(device_backend, op):
    device, backend = device_backend
    dtype = torch.float32
    n = 96
    big = torch.randn(10, 2 * n + 5, device=device, dtype=dtype)
    cases = {
        "row_stride": big[:, 3 : 3 + n],  # rows farther apart than n
        "permuted": torch.randn(5, 7, n, device=device, dtype=dtype).transpose(0, 1),  # (7, 5, n), no 2-D view
        "hidden_stride": torch.randn(n, 6, device=device, dtype=dtype).t(),  # stride 6 along the hidden dim
        "expanded": torch.randn(1, n, device=device, dtype=dtype).expand(4, n),  # row stride 0
    }
    weight = torch.randn(n, device=device, dtype=dtype)
    for name, x in cases.items():
        residual = torch.randn(x.shape, device=device, dtype=dtype).transpose(0, -2).contiguous().transpose(0, -2)
        for res in (None, residual):
            got = call(op, x, weight, None, res, 0.0, backend)
            want = call(op, x.contiguous(), weight, None, None if res is None else res.contiguous(), 0.0, "reference")
            for g, w in zip(got if res is not None else [got], want if res is not None else [want]):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name}: {s}")
    # gradients through a strided view
    x = big[:, 3 : 3 + n].detach().requires_grad_()
    call(op, x, weight, None, None, 0.0, backend).square().sum().backward()
    x_ref = big[:, 3 : 3 + n].detach().contiguous().requires_grad_()
    call(op, x_ref, weight, None, None, 0.0, "reference").square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_follow_the_formula_row_by_row(device_backend, op):
    """Defined NaN/inf behaviour, the IEEE result of the formula, as PyTorch gives it: a NaN makes
    its whole row NaN; an inf makes a LayerNorm row NaN and an RMSNorm row 0 except NaN where the
    inf was (rstd = 1/sqrt(inf) = 0). Other rows are unaffected."""
    device, backend = device_backend
    n = 300
    x = torch.randn(6, n, device=device)
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    x[4, n - 1] = float("-inf")
    weight = torch.randn(n, device=device)
    got = call(op, x, weight, None, None, 0.0, backend)
    want = call(op, x, weight, None, None, 0.0, "reference")
    assert torch.isnan(got[1]).all(), "a NaN must poison its row"
    if op == "layer_norm":
        assert torch.isnan(got[[3, 4]]).all()
    else:
        assert torch.isnan(got[3, 0]) and torch.isnan(got[4, n - 1])
        assert (got[3, 1:] == 0).all() and (got[4, : n - 1] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(want[3], getattr(torch.nn.functional, op)(x, (n,), weight)[3], equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (3, 0)])
def test_empty_input(device_backend, op, shape):
    device, backend = device_backend
    x = torch.randn(shape, device=device, requires_grad=True)
    n = shape[-1]
    weight = torch.randn(n, device=device, requires_grad=True)
    out = call(op, x, weight, None, None, 0.0, backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_eps_is_added_to_the_variance(device_backend, op, eps):
    """Inputs whose variance is comparable to eps, so a misplaced or missing eps shows."""
    device, backend = device_backend
    shift = 0.3 if op == "layer_norm" else 0.0  # LayerNorm removes the mean; RMSNorm must not have one
    x = (torch.randn(7, 257, device=device, dtype=torch.float64) * eps**0.5 + shift).float()
    got = call(op, x, None, None, None, 0.0, backend, eps=eps)
    want = call(op, x.double(), None, None, None, 0.0, "reference", eps=eps).float()
    # An fp32 mean of values near `shift` is off by about ulp(shift), and the output divides that
    # by the standard deviation (~sqrt(2 eps) here): the error floor of any fp32 implementation
    # (1.5e-5 seen at eps 1e-5 over 2000 seeds, which failed a flat 1e-5 one run in 12).
    floor = 4 * torch.finfo(torch.float32).eps * shift / math.sqrt(2 * eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=max(1e-5, floor))
    wrong = call(op, x.double(), None, None, None, 0.0, "reference", eps=eps * 1.01).float()
    assert (got - want).abs().max() < (wrong - want).abs().max() / 10  # the test can tell eps from 1.01 eps


def test_rms_norm_eps_none_is_torch_eps(device_backend):
    device, backend = device_backend
    x = torch.randn(5, 33, device=device) * 1e-4  # small enough that eps matters
    got = lmkern.rms_norm(x, (33,), None, None, backend=backend)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x, (33,), None, None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_multi_dim_normalized_shape(device_backend, op):
    device, backend = device_backend
    x = torch.randn(3, 4, 6, 5, device=device)
    w = torch.randn(6, 5, device=device)
    if op == "layer_norm":
        b = torch.randn(6, 5, device=device)
        got = lmkern.layer_norm(x, (6, 5), w, b, 1e-5, backend=backend)
        want = torch.nn.functional.layer_norm(x, (6, 5), w, b, 1e-5)
    else:
        got = lmkern.rms_norm(x, [6, 5], w, 1e-6, backend=backend)
        want = torch.nn.functional.rms_norm(x, [6, 5], w, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, normalized", [((4, 8), (4, 8)), ((7,), (7,)), ((2, 3, 5), (3, 5))])
def test_normalized_shape_spanning_every_dim(device_backend, op, shape, normalized):
    # inputs whose normalized dims are all (or all but one) of their dims: one row, or rows of
    # several dims, with the residual fused; values and every gradient against torch
    device, backend = device_backend
    x, r = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(normalized, device=device, requires_grad=True)
    b = torch.randn(normalized, device=device, requires_grad=True)
    if op == "layer_norm":
        got, h = lmkern.layer_norm(x, normalized, w, b, 1e-5, residual=r, backend=backend)
        want = torch.nn.functional.layer_norm(x + r, normalized, w, b, 1e-5)
        leaves = (x, r, w, b)
    else:
        got, h = lmkern.rms_norm(x, normalized, w, 1e-6, residual=r, backend=backend)
        want = torch.nn.functional.rms_norm(x + r, normalized, w, 1e-6)
        leaves = (x, r, w)
    assert got.shape == h.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, x + r)
    g = torch.randn(shape, device=device)
    for a, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_same_inputs_same_bits(device_backend, op):
    device, backend = device_backend
    inputs = make_inputs(op, "residual", 64, 777, torch.float32, device)
    upstream = [torch.randn(64, 777, device=device) for _ in range(2)]
    a = run_with_grads(op, inputs, backend, upstream)
    b = run_with_grads(op, inputs, backend, upstream)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


@pytest.mark.skipif(not _ext.HAS_CPP, reason="needs the C++ CPU kernels (their presence is checked in test_environment)")
@pytest.mark.parametrize("op", OPS)
def test_cpu_backward_independent_of_thread_count(op):
    inputs = make_inputs(op, "affine", 300, 513, torch.float32, "cpu")
    upstream = [torch.randn(300, 513)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(op, inputs, "cpu", upstream)
        torch.set_num_threads(max(2, threads))
        many = run_with_grads(op, inputs, "cpu", upstream)
    finally:
        torch.set_num_threads(threads)
    for k in one[1]:
        assert torch.equal(one[1][k], many[1][k]), k
