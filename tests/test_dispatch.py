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
