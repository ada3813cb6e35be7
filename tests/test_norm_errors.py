"""Bad input to the norm functions: a clear ValueError/TypeError naming the argument."""

import pytest
import torch

import lmkern


@pytest.fixture(params=["layer_norm", "rms_norm"])
def norm(request):
    return getattr(lmkern, request.param)


def test_weight_of_wrong_size(norm, device_backend):
    device, backend = device_backend
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        norm(x, (8,), torch.ones(7, device=device), backend=backend)


def test_bias_of_wrong_size(device_backend):
    device, backend = device_backend
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="bias"):
        lmkern.layer_norm(x, (8,), torch.ones(8, device=device), torch.ones(9, device=device), backend=backend)


@pytest.mark.parametrize("shape", [(4,), (3, 8), (2, 4, 8, 1), ()])
def test_normalized_shape_not_trailing(norm, shape):
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        norm(x, shape)


def test_normalized_shape_wrong_type(norm):
    with pytest.raises(TypeError, match="normalized_shape"):
        norm(torch.randn(2, 8), "8")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input(norm, dtype):
    x = torch.ones(2, 8).to(dtype)
    with pytest.raises(TypeError, match="input"):
        norm(x, (8,))


def test_integer_weight(norm):
    with pytest.raises(TypeError, match="weight"):
        norm(torch.randn(2, 8), (8,), torch.ones(8, dtype=torch.int64))


def test_residual_of_another_shape(norm):
    with pytest.raises(ValueError, match="residual"):
        norm(torch.randn(2, 8), (8,), residual=torch.randn(3, 8))


def test_residual_of_another_dtype(norm):
    with pytest.raises(TypeError, match="residual"):
        norm(torch.randn(2, 8), (8,), residual=torch.randn(2, 8, dtype=torch.float64))


def test_residual_on_another_device(norm):
    with pytest.raises(ValueError, match="residual"):
        norm(torch.randn(2, 8), (8,), residual=torch.randn(2, 8, device="meta"))


def test_weight_on_another_device(norm):
    with pytest.raises(ValueError, match="weight"):
        norm(torch.randn(2, 8), (8,), torch.randn(8, device="meta"))


def test_weight_offset_without_weight(norm):
    with pytest.raises(ValueError, match="weight_offset"):
        norm(torch.randn(2, 8), (8,), weight_offset=1.0)


def test_unknown_backend(norm):
    with pytest.raises(ValueError, match="backend"):
        norm(torch.randn(2, 8), (8,), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        norm(torch.randn(0, 8), (8,), backend="fast")


def test_unknown_backend_in_environment(norm, monkeypatch):
    monkeypatch.setenv("LMKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="LMKERN_BACKEND"):
        norm(torch.randn(2, 8), (8,))


def test_ops_called_directly_check_their_inputs(kernel_device_backend):
    """The custom ops are public too (torch.ops.lmkern.*): they reject bad shapes themselves."""
    device, backend = kernel_device_backend
    from lmkern import dispatch

    fwd = dispatch.implementation("rms_norm", backend)
    x = torch.randn(4, 8, device=device)
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        fwd(x, torch.ones(9, device=device), None, 1e-6, 0.0)
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        fwd(x, None, torch.randn(4, 9, device=device), 1e-6, 0.0)
    with pytest.raises((ValueError, RuntimeError), match="input"):
        fwd(torch.randn(2, 4, 8, device=device), None, None, 1e-6, 0.0)
