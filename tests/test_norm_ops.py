"""The custom ops pass torch.library.opcheck and run under torch.compile(fullgraph=True)."""

import pytest
import torch

import lmkern
from lmkern import dispatch

OP_NAMES = {
    "cpu": ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"),
    "cuda": ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"),
    "triton": ("layer_norm_fwd_triton", "layer_norm_bwd_triton", "rms_norm_fwd_triton", "rms_norm_bwd_triton"),
}


def _sample_args(device, with_residual, weight_dtype=torch.float32):
    m, n = 6, 40
    x = torch.randn(m, n, device=device, requires_grad=True)
    w = torch.randn(n, device=device, dtype=weight_dtype, requires_grad=True)
    b = torch.randn(n, device=device, dtype=weight_dtype, requires_grad=True)
    r = torch.randn(m, n, device=device, requires_grad=True) if with_residual else None
    return x, w, b, r


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(kernel_device_backend, with_residual):
    device, backend = kernel_device_backend
    ln_fwd, ln_bwd, rms_fwd, rms_bwd = (getattr(torch.ops.lmkern, n) for n in OP_NAMES[backend])
    x, w, b, r = _sample_args(device, with_residual)
    torch.library.opcheck(ln_fwd, (x, w, b, r, 1e-5, 0.0))
    torch.library.opcheck(ln_fwd, (x, None, None, r, 1e-5, 0.0))
    torch.library.opcheck(rms_fwd, (x, w, r, 1e-6, 1.0))
    torch.library.opcheck(rms_fwd, (x, None, r, 1e-6, 0.0))
    with torch.no_grad():
        h = x + r if with_residual else x
        _, _, mean, rstd = ln_fwd(x, w, b, r, 1e-5, 0.0)
        dy = torch.randn_like(x)
        dr = torch.randn_like(x) if with_residual else None
        torch.library.opcheck(ln_bwd, (dy, dr, h.detach(), w.detach(), b.detach(), mean, rstd, 0.0))
        torch.library.opcheck(ln_bwd, (dy, dr, h.detach(), None, None, mean, rstd, 0.0))
        _, _, rstd = rms_fwd(x, w, r, 1e-6, 0.0)
        torch.library.opcheck(rms_bwd, (dy, dr, h.detach(), w.detach(), rstd, 0.0))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_compile_fullgraph(device_backend, op):
    device, backend = device_backend
    n = 64
    w = torch.randn(n, device=device, requires_grad=True)
    b = torch.randn(n, device=device, requires_grad=True)

    def block(x, r):
        if op == "layer_norm":
            y, h = lmkern.layer_norm(x, (n,), w, b, 1e-5, residual=r, backend=backend)
        else:
            y, h = lmkern.rms_norm(x, (n,), w, 1e-6, residual=r, backend=backend)
        return (y * 2).sum() + h.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 5, n, device=device, requires_grad=True)
    r = torch.randn(4, 5, n, device=device, requires_grad=True)
    got = compiled(x, r)
    gx, gr, gw = torch.autograd.grad(got, (x, r, w))
    want = block(x, r)
    wx, wr, ww = torch.autograd.grad(want, (x, r, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, e in ((gx, wx), (gr, wr), (gw, ww)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


def test_compile_with_dynamic_shapes(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: lmkern.rms_norm(x, (x.shape[-1],), w, backend=backend), fullgraph=True, dynamic=True)
    for m in (3, 9, 17):
        x = torch.randn(m, 32, device=device)
        w = torch.randn(32, device=device)
        torch.testing.assert_close(f(x, w), torch.nn.functional.rms_norm(x, (32,), w), rtol=1e-5, atol=1e-5)


def test_backend_names_are_registered():
    for op in ("layer_norm", "rms_norm"):
        assert set(dispatch._REGISTRY[op]) == set(dispatch.BACKENDS)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_double_backward_raises_on_the_kernels_and_works_on_the_reference(device_backend, op):
    # the kernels' backward has no derivative: a gradient of a gradient fails loudly (the C++ one
    # used to be taken for constant, with only a warning, and gave zeros); the reference is torch
    device, backend = device_backend
    x = torch.randn(4, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    f = getattr(lmkern, op)
    y = f(x, (16,), w, backend=backend)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    if backend != "reference":
        with pytest.raises(RuntimeError, match=f"{op}_bwd"):
            gx.pow(2).sum().backward()
        return
    gx.pow(2).sum().backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = getattr(torch.nn.functional, op)(x64, (16,), w64)
    (g64,) = torch.autograd.grad(y64.pow(2).sum(), x64, create_graph=True)
    g64.pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-3)
