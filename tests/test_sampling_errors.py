"""Bad input to lmkern.sample / lmkern.softmax: a clear ValueError/TypeError naming the argument,
raised before any kernel runs (so on every backend alike)."""

import pytest
import torch

import lmkern


@pytest.fixture
def x(device_backend):
    return torch.randn(4, 10, device=device_backend[0])


def _sample(device_backend, *args, **kwargs):
    return lmkern.sample(*args, backend=device_backend[1], **kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64])
def test_non_float_logits(device_backend, dtype):
    logits = torch.ones(2, 8).to(dtype)
    with pytest.raises(TypeError, match="logits"):
        _sample(device_backend, logits)
    with pytest.raises(TypeError, match="logits"):
        lmkern.softmax(logits, backend=device_backend[1])


def test_logits_not_a_tensor(device_backend):
    with pytest.raises(TypeError, match="logits"):
        _sample(device_backend, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="logits"):
        lmkern.softmax([1.0, 2.0])


@pytest.mark.parametrize("shape", [(), (2, 3, 4)])
def test_logits_wrong_ndim(device_backend, shape):
    with pytest.raises(ValueError, match="logits"):
        _sample(device_backend, torch.randn(shape))


def test_softmax_zero_dim():
    with pytest.raises(ValueError, match="logits"):
        lmkern.softmax(torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0)])
def test_empty_vocabulary(device_backend, shape):
    with pytest.raises(ValueError, match="V >= 1"):
        _sample(device_backend, torch.randn(shape))


@pytest.mark.parametrize("T", [-0.5, float("nan"), float("inf"), -float("inf")])
def test_bad_temperature(device_backend, x, T):
    with pytest.raises(ValueError, match="temperature"):
        _sample(device_backend, x, T)
    with pytest.raises(ValueError, match="temperature"):
        lmkern.softmax(x, T)


@pytest.mark.parametrize("T", [1e39, 3.5e38])
def test_temperature_beyond_float32(device_backend, x, T):
    # finite as a Python float, inf in the kernels' float32 (as a tensor's value would be)
    with pytest.raises(ValueError, match="temperature.*float32"):
        _sample(device_backend, x, T)
    with pytest.raises(ValueError, match="temperature.*float32"):
        lmkern.softmax(x, T)


@pytest.mark.parametrize("T", [None, "1.0", True, 1j])
def test_temperature_wrong_type(device_backend, x, T):
    with pytest.raises(TypeError, match="temperature"):
        _sample(device_backend, x, T)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_bad_top_p(device_backend, x, p):
    with pytest.raises(ValueError, match="top_p"):
        _sample(device_backend, x, top_p=p)


@pytest.mark.parametrize("k", [-1, -100])
def test_negative_top_k(device_backend, x, k):
    with pytest.raises(ValueError, match="top_k"):
        _sample(device_backend, x, top_k=k)


@pytest.mark.parametrize("k", [2.0, 2.5, True, "3"])
def test_top_k_wrong_type(device_backend, x, k):
    with pytest.raises(TypeError, match="top_k"):
        _sample(device_backend, x, top_k=k)


@pytest.mark.parametrize("m", [-0.01, 1.5, float("nan")])
def test_bad_min_p(device_backend, x, m):
    with pytest.raises(ValueError, match="min_p"):
        _sample(device_backend, x, min_p=m)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("temperature", torch.tensor([1.0, 1.0, -1.0, 1.0]), r"temperature\[2\]"),
        ("temperature", torch.tensor([1.0, float("nan"), 1.0, 1.0]), r"temperature\[1\]"),
        ("top_k", torch.tensor([0, 3, -2, 1]), r"top_k\[2\]"),
        ("top_p", torch.tensor([0.5, 1.0, 0.0, 0.9]), r"top_p\[2\]"),
        ("top_p", torch.tensor([0.5, 1.2, 0.3, 0.9]), r"top_p\[1\]"),
        ("min_p", torch.tensor([0.0, 0.0, 0.0, 1.1]), r"min_p\[3\]"),
    ],
)
def test_bad_per_row_values_name_the_row(device_backend, x, name, value, match):
    with pytest.raises(ValueError, match=match):
        _sample(device_backend, x, **{name: value})


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p", "min_p"])
@pytest.mark.parametrize("shape", [(3,), (5,), (4, 1), (1,)])
def test_per_row_tensor_of_wrong_shape(device_backend, x, name, shape):
    value = torch.ones(shape, dtype=torch.int64 if name == "top_k" else torch.float32)
    with pytest.raises(ValueError, match=name):
        _sample(device_backend, x, **{name: value})


@pytest.mark.parametrize(
    "name, dtype",
    [("temperature", torch.int64), ("top_p", torch.int32), ("min_p", torch.bool), ("top_k", torch.float32), ("top_k", torch.bool)],
)
def test_per_row_tensor_of_wrong_dtype(device_backend, x, name, dtype):
    with pytest.raises(TypeError, match=name):
        _sample(device_backend, x, **{name: torch.ones(4).to(dtype)})


def test_seed_and_generator_together(device_backend, x):
    with pytest.raises(ValueError, match="seed or generator"):
        _sample(device_backend, x, seed=1, generator=torch.Generator())


@pytest.mark.parametrize("seed", [1.5, "7", True])
def test_seed_wrong_type(device_backend, x, seed):
    with pytest.raises(TypeError, match="seed"):
        _sample(device_backend, x, seed=seed)


@pytest.mark.parametrize("seed", [torch.arange(3), torch.tensor(5), torch.arange(8).reshape(4, 2)])
def test_seed_tensor_of_wrong_shape(device_backend, x, seed):
    with pytest.raises(ValueError, match="seed"):
        _sample(device_backend, x, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_seed_tensor_of_wrong_dtype(device_backend, x, dtype):
    with pytest.raises(TypeError, match="seed"):
        _sample(device_backend, x, seed=torch.ones(4).to(dtype))


def test_generator_wrong_type(device_backend, x):
    with pytest.raises(TypeError, match="generator"):
        _sample(device_backend, x, generator=42)


def test_return_logprobs_wrong_type(device_backend, x):
    with pytest.raises(TypeError, match="return_logprobs"):
        _sample(device_backend, x, return_logprobs="yes")


def test_unknown_backend(x):
    with pytest.raises(ValueError, match="backend"):
        lmkern.sample(x, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        lmkern.sample(x[:0], backend="fast")
    with pytest.raises(ValueError, match="backend"):
        lmkern.softmax(x, backend="fast")


def test_softmax_temperature_tensor_of_wrong_shape_or_dtype(device_backend):
    x = torch.randn(2, 3, 10, device=device_backend[0])
    with pytest.raises(ValueError, match="temperature"):
        lmkern.softmax(x, torch.ones(2), backend=device_backend[1])
    with pytest.raises(ValueError, match="temperature"):
        lmkern.softmax(x, torch.ones(6), backend=device_backend[1])
    with pytest.raises(TypeError, match="temperature"):
        lmkern.softmax(x, torch.ones(2, 3, dtype=torch.int64), backend=device_backend[1])


def test_first_bad_argument_is_named(x):
    # the first bad argument is named even when later ones are bad too
    with pytest.raises(ValueError, match="temperature"):
        lmkern.sample(x, -1.0, top_k=-1)
