"""Backend selection: auto, the backend= argument, LMKERN_BACKEND, and errors that explain."""

import pytest
import torch

import lmkern
from lmkern import dispatch


def test_auto_on_cpu_picks_the_cpp_kernels_when_built():
    spec = dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": (torch.float32,)})
    name, _ = dispatch.select("rms_norm", None, spec)
    assert name == ("cpu" if dispatch.backend_available("cpu") is None else "reference")


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    spec = dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": ()})
    assert "triton" not in dispatch.preference("layer_norm", "cpu")
    assert dispatch.select("layer_norm", None, spec)[0] != "triton"


def test_float64_goes_to_the_reference():
    spec = dispatch.InputSpec("cpu", torch.float64, {"affine_dtypes": (torch.float64,)})
    assert dispatch.select("layer_norm", None, spec)[0] == "reference"
    from lmkern.ops.norm import _kernel_support

    assert "reference backend" in _kernel_support(spec)


def test_backend_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("LMKERN_BACKEND", "reference")
    spec = dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": ()})
    assert dispatch.select("rms_norm", None, spec)[0] == "reference"
    if dispatch.backend_available("cpu") is None:
        assert dispatch.select("rms_norm", "cpu", spec)[0] == "cpu"


def test_environment_override_is_used(monkeypatch):
    calls = []
    real = dispatch.implementation("rms_norm", "reference")

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setitem(dispatch._REGISTRY["rms_norm"], "reference", dispatch._Impl(dispatch._REGISTRY["rms_norm"]["reference"].supports, spy))
    monkeypatch.setenv("LMKERN_BACKEND", "reference")
    lmkern.rms_norm(torch.randn(2, 8), (8,))
    assert len(calls) == 1


def test_a_spec_seen_before_gets_the_same_choice_without_asking_the_backends_again(monkeypatch):
    asked = []
    impls = dispatch._REGISTRY["rms_norm"]
    ref = impls["reference"]

    def picky(spec):  # declines bfloat16, counts how often it is asked
        asked.append(spec.dtype)
        return "no bfloat16 here" if spec.dtype == torch.bfloat16 else None

    monkeypatch.setitem(impls, "reference", dispatch._Impl(picky, ref.run))
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    spec = dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": (torch.float32,)})
    first = dispatch.select("rms_norm", "reference", spec)
    again = dispatch.select("rms_norm", "reference", dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": (torch.float32,)}))
    assert first == again and asked == [torch.float32]
    # another extra, another dtype or another requested backend is a new question
    dispatch.select("rms_norm", "reference", dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": ()}))
    assert len(asked) == 2
    # a refusal is not remembered: it raises with every backend's reason each time
    bf16 = dispatch.InputSpec("cpu", torch.bfloat16, {"affine_dtypes": ()})
    for _ in range(2):
        with pytest.raises(dispatch.BackendError, match="no bfloat16 here"):
            dispatch.select("rms_norm", "reference", bf16)
    # LMKERN_BACKEND is read on every call, so changing it changes the choice
    monkeypatch.setenv("LMKERN_BACKEND", "reference")
    assert dispatch.select("rms_norm", None, spec)[0] == "reference"
    monkeypatch.setenv("LMKERN_BACKEND", "auto")
    assert dispatch.select("rms_norm", None, spec)[0] == ("cpu" if dispatch.backend_available("cpu") is None else "reference")
    # registering a backend forgets every choice
    dispatch.register("rms_norm", "reference", picky, ref.run)
    assert dispatch._CHOSEN == {}


def test_unfit_backend_error_lists_every_backend():
    x = torch.randn(2, 8)
    with pytest.raises(dispatch.BackendError) as err:
        lmkern.layer_norm(x, (8,), backend="cuda")
    text = str(err.value)
    for name in dispatch.BACKENDS:
        assert f"  {name}: " in text
    assert "can run these inputs" in text  # the reference at least


def test_weight_dtype_mismatch_is_explained():
    spec = dispatch.InputSpec("cpu", torch.float32, {"affine_dtypes": (torch.bfloat16,)})
    from lmkern.ops.norm import _kernel_support

    assert "weight/bias dtype" in _kernel_support(spec)
    x = torch.randn(3, 8)
    out = lmkern.layer_norm(x, (8,), torch.ones(8, dtype=torch.bfloat16))  # auto: falls to the reference
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))


def test_bfloat16_triton_refused_in_the_interpreter():
    spec = dispatch.InputSpec("cpu", torch.bfloat16, {"affine_dtypes": ()})
    why = dispatch.reasons("rms_norm", spec)["triton"]
    assert why is not None and ("interpreter" in why or "Triton" in why)


def test_ops_skip_their_autograd_layer_only_when_no_gradient_can_flow(monkeypatch, kernel_device_backend):
    """lmkern.ops._fastpath.below_autograd: under no_grad, or with no input requiring grad, the
    kernel op runs below the Autograd key (the same values, no graph); with an input requiring
    grad it goes through autograd (a graph, and the reference's gradient)."""
    from lmkern.ops import _fastpath

    device, backend = kernel_device_backend
    entered = []
    real_guard = _fastpath._below_autograd_guard
    monkeypatch.setattr(_fastpath, "_below_autograd_guard", lambda: entered.append(1) or real_guard())
    x = torch.randn(3, 16, device=device)
    w = torch.randn(16, device=device, requires_grad=True)
    expected = lmkern.rms_norm(x, (16,), w.detach(), 1e-6, backend="reference")

    with torch.no_grad():
        y = lmkern.rms_norm(x, (16,), w, 1e-6, backend=backend)
    assert len(entered) == 1 and y.grad_fn is None
    torch.testing.assert_close(y, expected)
    y = lmkern.rms_norm(x, (16,), w.detach(), 1e-6, backend=backend)
    assert len(entered) == 2 and y.grad_fn is None
    torch.testing.assert_close(y, expected)

    y = lmkern.rms_norm(x, (16,), w, 1e-6, backend=backend)
    assert len(entered) == 2 and y.grad_fn is not None
    (g,) = torch.autograd.grad(y.sum(), w)
    w64 = w.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(lmkern.rms_norm(x.double(), (16,), w64, 1e-6, backend="reference").sum(), w64)
    torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)
