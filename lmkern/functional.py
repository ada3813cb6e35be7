"""User-facing functions. Signatures follow torch.nn.functional; lmkern's extras are keyword-only.

Every function validates its arguments (ValueError/TypeError naming the argument), picks a
backend (see lmkern.dispatch: ``backend=`` or ``LMKERN_BACKEND`` override ``"auto"``) and calls
that backend's custom op, which carries autograd and works under torch.compile.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lmkern import dispatch
from lmkern.ops import attention as attention_ops
from lmkern.ops import norm as norm_ops
from lmkern.ops import sampling as sampling_ops

ShapeLike = Union[int, Sequence[int], torch.Size]


def _normalized_shape(op: str, input: Tensor, normalized_shape: ShapeLike) -> tuple[int, ...]:
    if type(normalized_shape) is int and input.dim() >= 1 and input.shape[-1] == normalized_shape:
        return (normalized_shape,)  # the common call, without the checks' generality (~1 µs)
    if isinstance(normalized_shape, numbers.Integral):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, (str, bytes)) or isinstance(normalized_shape, Tensor) and normalized_shape.dim() != 1:
        raise TypeError(f"lmkern.{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    else:
        try:
            shape = tuple(int(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(f"lmkern.{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"lmkern.{op}: normalized_shape {list(shape)} must be the trailing dimensions of input, "
            f"whose shape is {list(input.shape)}"
        )
    return shape


def _check_param(op: str, name: str, t: Optional[Tensor], shape: tuple[int, ...], input: Tensor) -> Optional[Tensor]:
    """Validates weight/bias and returns it flattened to (N,)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"lmkern.{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"lmkern.{op}: {name} must have shape {list(shape)} (normalized_shape), got {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"lmkern.{op}: {name} must be floating point, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"lmkern.{op}: {name} is on {t.device} but input is on {input.device}")
    return t if t.dim() == 1 else t.reshape(-1)


def _prepare_norm(op, input, normalized_shape, residual, weight_offset):
    """Checks input/residual; returns (normalized shape, input as 2-D, residual as 2-D or None)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"lmkern.{op}: input must be a Tensor, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"lmkern.{op}: input must be a floating-point tensor, got {input.dtype}")
    shape = _normalized_shape(op, input, normalized_shape)
    n = math.prod(shape)
    m = math.prod(input.shape[: input.dim() - len(shape)])
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"lmkern.{op}: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(f"lmkern.{op}: residual must have input's shape {list(input.shape)}, got {list(residual.shape)}")
        if residual.device != input.device:
            raise ValueError(f"lmkern.{op}: residual is on {residual.device} but input is on {input.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"lmkern.{op}: residual must have input's dtype {input.dtype}, got {residual.dtype}")
    if type(weight_offset) is not float and not isinstance(weight_offset, numbers.Real):  # ABC check: ~0.5 µs
        raise TypeError(f"lmkern.{op}: weight_offset must be a float, got {type(weight_offset).__name__}")
    rows_already = input.dim() == 2 and len(shape) == 1  # (rows, N) is the kernels' layout: no reshape
    x2d = input if rows_already else input.reshape(m, n)
    r2d = None if residual is None else residual if rows_already else residual.reshape(m, n)
    return shape, x2d, r2d


def _as_input_shape(t: Tensor, input: Tensor) -> Tensor:
    """A (rows, N) kernel result in input's shape (view_as: a third of reshape(Size)'s cost)."""
    if t.shape == input.shape:
        return t
    return t.view_as(input) if t.is_contiguous() else t.reshape(input.shape)


def _backend_for(op: str, backend: Optional[str], x2d: Tensor, weight, bias):
    if x2d.numel() == 0:
        # Empty inputs (no rows, or a zero-size normalized_shape): the reference returns the
        # right empty shapes on every device; there is nothing for a kernel to do.
        dispatch.requested_backend(backend)  # still reject a misspelled backend
        return "reference", dispatch.implementation(op, "reference")
    return dispatch.select(op, backend, norm_ops.norm_spec(x2d, weight, bias))


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    weight_offset: float = 0.0,
    backend: Optional[str] = None,
):
    """Layer normalization over the trailing ``normalized_shape`` dims, like F.layer_norm.

    ``y = (h - mean(h)) / sqrt(var(h) + eps) * (weight + weight_offset) + bias`` with biased
    variance, statistics in float32, output in input's dtype.

    Args:
        input: (..., *normalized_shape), float32/float16/bfloat16 (float64 runs on the reference).
        normalized_shape: int or sequence, the trailing dims of ``input``.
        weight, bias: optional, shape ``normalized_shape``; input's dtype or float32.
        eps: added to the variance.
        residual: optional tensor of input's shape and dtype. When given, ``h = input + residual``
            and the call returns ``(y, h)``: the fused pre-norm residual add.
        weight_offset: scale by ``weight + weight_offset`` (1.0 for Gemma-style (1 + w) weights).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides LMKERN_BACKEND.

    Returns:
        ``y`` with input's shape, or ``(y, h)`` when ``residual`` is given.
    """
    op = "layer_norm"
    shape, x2d, r2d = _prepare_norm(op, input, normalized_shape, residual, weight_offset)
    w = _check_param(op, "weight", weight, shape, input)
    b = _check_param(op, "bias", bias, shape, input)
    if weight_offset != 0.0 and w is None:
        raise ValueError(f"lmkern.{op}: weight_offset={weight_offset} needs a weight")
    _, fwd = _backend_for(op, backend, x2d, w, b)
    out, residual_out, _mean, _rstd = fwd(x2d, w, b, r2d, float(eps), float(weight_offset))
    out = _as_input_shape(out, input)
    return (out, _as_input_shape(residual_out, input)) if residual is not None else out


def rms_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    weight_offset: float = 0.0,
    backend: Optional[str] = None,
):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims, like F.rms_norm.

    ``y = h / sqrt(mean(h^2) + eps) * (weight + weight_offset)``, statistics in float32, output in
    input's dtype. ``eps=None`` means ``torch.finfo(input.dtype).eps``, as in torch.

    Args:
        input: (..., *normalized_shape), float32/float16/bfloat16 (float64 runs on the reference).
        normalized_shape: int or sequence, the trailing dims of ``input``.
        weight: optional, shape ``normalized_shape``; input's dtype or float32.
        eps: added to the mean square; None for the dtype's machine epsilon.
        residual: optional tensor of input's shape and dtype. When given, ``h = input + residual``
            and the call returns ``(y, h)``: the fused pre-norm residual add.
        weight_offset: scale by ``weight + weight_offset`` (1.0 for Gemma-style (1 + w) weights).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides LMKERN_BACKEND.

    Returns:
        ``y`` with input's shape, or ``(y, h)`` when ``residual`` is given.
    """
    op = "rms_norm"
    shape, x2d, r2d = _prepare_norm(op, input, normalized_shape, residual, weight_offset)
    w = _check_param(op, "weight", weight, shape, input)
    if weight_offset != 0.0 and w is None:
        raise ValueError(f"lmkern.{op}: weight_offset={weight_offset} needs a weight")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    _, fwd = _backend_for(op, backend, x2d, w, None)
    out, residual_out, _rstd = fwd(x2d, w, r2d, float(eps), float(weight_offset))
    out = _as_input_shape(out, input)
    return (out, _as_input_shape(residual_out, input)) if residual is not None else out


# ----------------------------------------------------------------------------- sampling

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1
_F32_MAX = torch.finfo(torch.float32).max
_DISABLED = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
# per-row parameter -> (kind, accepted range as text, test on a Python number, test on a tensor)
_RANGES = {
    "temperature": ("float", "finite and >= 0 (0 is greedy)", lambda v: 0 <= v < math.inf, lambda t: (t >= 0) & (t < math.inf)),
    "top_k": ("int", ">= 0 (0 disables it)", lambda v: v >= 0, lambda t: t >= 0),
    "top_p": ("float", "in (0, 1] (1 disables it)", lambda v: 0 < v <= 1, lambda t: (t > 0) & (t <= 1)),
    "min_p": ("float", "in [0, 1] (0 disables it)", lambda v: 0 <= v <= 1, lambda t: (t >= 0) & (t <= 1)),
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_logits(op: str, logits) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"lmkern.{op}: logits must be a Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"lmkern.{op}: logits must be a floating-point tensor, got {logits.dtype}")


def _row_shapes(ndim: int, B: int) -> tuple[tuple[int, ...], ...]:
    """Shapes a per-row tensor may have: (B,) or () broadcast; for 1-D logits (one row), (1,) or ()."""
    return ((B,), ()) if ndim == 2 else ((1,), ())


def _per_row(op: str, name: str, value, B: int, ndim: int, device, checks: list):
    """Validates one sampling parameter; returns (scalar for the op, (B,) tensor or None).

    A tensor is converted to the op's dtype on the logits' device; its values are checked later,
    in one host sync for all parameters (``checks`` collects (name, bad-mask) pairs).
    """
    kind, allowed, ok_scalar, ok_tensor = _RANGES[name]
    if value is None:
        if name == "temperature":
            raise TypeError(f"lmkern.{op}: temperature must be a number or a tensor, not None (use 0 for greedy)")
        return _DISABLED[name], None
    if isinstance(value, Tensor):
        if kind == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"lmkern.{op}: {name} must be an int or an integer tensor, got a {value.dtype} tensor")
        if kind == "float" and not value.dtype.is_floating_point:
            raise TypeError(f"lmkern.{op}: {name} must be a float or a floating-point tensor, got a {value.dtype} tensor")
        shapes = _row_shapes(ndim, B)
        if tuple(value.shape) not in shapes:
            raise ValueError(
                f"lmkern.{op}: {name} must be a Python number or a tensor of shape {shapes[0]} (one value per row) "
                f"or (), got shape {tuple(value.shape)}"
            )
        t = value.detach().to(device=device, dtype=torch.int64 if kind == "int" else torch.float32)
        t = t.expand(B).contiguous() if t.dim() == 0 else t.reshape(B).contiguous()
        checks.append((name, ~ok_tensor(t), t))
        return _DISABLED.get(name, 1.0), t
    if kind == "int":
        if not _is_int(value):
            raise TypeError(f"lmkern.{op}: {name} must be an int, None or an integer tensor, got {value!r}")
        value = int(value)
    else:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"lmkern.{op}: {name} must be a float, None or a floating-point tensor, got {value!r}")
        value = float(value)
    if not ok_scalar(value):
        raise ValueError(f"lmkern.{op}: {name} must be {allowed}, got {value!r}")
    if kind == "int":
        value = min(value, _I64_MAX)  # any k >= V keeps every token; the ops take int64
    elif abs(value) > _F32_MAX:
        # the kernels compute in float32, where this value is inf (as a tensor's would be)
        raise ValueError(f"lmkern.{op}: {name} must be {allowed} and at most {_F32_MAX:.7g} (float32's largest), got {value!r}")
    return value, None


def _raise_bad_rows(op: str, checks: list) -> None:
    """One host sync for all per-row tensors; on failure, name the parameter, row and value."""
    if not checks:
        return
    flags = torch.stack([bad.any() for _, bad, _ in checks]).tolist()
    for (name, bad, t), flag in zip(checks, flags):
        if flag:
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"lmkern.{op}: {name}[{r}] = {t[r].item()!r}, but {name} must be {_RANGES[name][1]}")


def _seeds(op: str, seed, generator, B: int, ndim: int, device) -> tuple[int, Optional[Tensor]]:
    """(scalar seed as the op's int64, per-row seeds tensor or None)."""
    if seed is not None and generator is not None:
        raise ValueError(f"lmkern.{op}: pass seed or generator, not both")
    if generator is not None or seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"lmkern.{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        # One 64-bit key per row from the generator (default: torch's CPU generator, so
        # torch.manual_seed reproduces the draw). A tensor, not a Python int: no host sync for a
        # CUDA generator, and it traces under torch.compile.
        gen_device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64, device=gen_device, generator=generator)
        return 0, keys.to(device)
    if isinstance(seed, Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"lmkern.{op}: seed must be an int or an integer tensor, got a {seed.dtype} tensor")
        shapes = ((B,),) if ndim == 2 else ((1,), ())
        if tuple(seed.shape) not in shapes:
            raise ValueError(
                f"lmkern.{op}: a seed tensor must have shape {shapes[0]} (one seed per row), got {tuple(seed.shape)}; "
                "pass a Python int for one seed for the whole batch"
            )
        return 0, seed.detach().to(device=device, dtype=torch.int64).reshape(B).contiguous()
    if not _is_int(seed):
        raise TypeError(f"lmkern.{op}: seed must be an int, an integer tensor or None, got {seed!r}")
    s = int(seed)
    if not -(1 << 63) <= s < 1 << 63:  # (a range test, not a modulo: it also traces under compile)
        s %= _U64
        s = s - _U64 if s >= 1 << 63 else s  # the same 64 bits as an int64
    return s, None


def sample(
    logits: Tensor,
    temperature: Union[float, Tensor] = 1.0,
    top_k: Union[int, Tensor, None] = None,
    top_p: Union[float, Tensor, None] = None,
    min_p: Union[float, Tensor, None] = None,
    *,
    seed: Union[int, Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    return_logprobs: bool = False,
    backend: Optional[str] = None,
):
    """Draws one token id per row of ``logits``, fused: temperature, top-k, top-p, min-p, draw.

    The math is lmkern/reference/sampling.py: ``z = logits / temperature``; top-k keeps the k
    largest z (ties with the k-th kept), then top-p keeps the smallest most-likely set holding
    probability mass >= p, then min-p drops tokens with probability < min_p * the largest (the
    filters in Hugging Face's order); the id is drawn from softmax(z) over the survivors. The
    most likely token always survives. ``temperature == 0`` is greedy (first argmax; no filters).
    Computation in float32 whatever the logits' dtype. Not differentiable.

    Args:
        logits: (B, V) floating point, any row stride; or (V,) for one row (then ids and
            logprobs are 0-d). float64 runs on the reference backend.
        temperature: >= 0 and finite in float32 (the math is float32). A temperature so small
            (or logits so large) that the largest logit over it overflows float32 gives the limit
            temperature -> 0, the first argmax, as ``temperature=0`` does: every other token's
            probability is then exactly 0 in float32.
        top_k: keep the k most likely tokens; None or 0 disables, k >= V keeps everything.
        top_p: in (0, 1]; None or 1.0 disables.
        min_p: in [0, 1]; None or 0 disables.
            Each of these is a Python number or a tensor of shape (B,) (one value per row; a
            disabling value turns the filter off for that row) or (); on any device (moved to
            the logits' device). Per-row values are checked with one host sync (skipped under
            torch.compile).
        seed: a Python int (any, taken mod 2**64; row r uses Philox stream r) or an integer
            tensor of shape (B,) (row r uses key seed[r], stream 0: a row's draw depends only on
            its logits, parameters and seed, not on the other rows).
        generator: a torch.Generator to draw one 64-bit key per row from (not with ``seed``).
            With neither, the keys are drawn from torch's default CPU generator, so
            ``torch.manual_seed`` makes calls reproducible.
        return_logprobs: also return ``log_softmax(logits.float())[id]`` per row (the
            unfiltered, temperature-1 distribution), float32.
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides LMKERN_BACKEND.

    Returns:
        ids, int64 of shape (B,) (or ()), or ``(ids, logprobs)`` when ``return_logprobs``.

    Raises:
        ValueError if a row has a NaN or +inf logit or no finite logit (``-inf`` logits are
        valid and never drawn), naming the first such row. The check needs the ids on the host;
        under torch.compile it is skipped and such rows come back as id -1 (logprob NaN).

    Under torch.compile(fullgraph=True): an int ``seed`` or ``top_k`` that changes between calls
    becomes a graph input after the first recompile; a Python float (temperature, top_p, min_p)
    is a constant of the graph, so pass a tensor for values that change; ``generator=`` cannot be
    traced (use ``seed=``, or neither: the keys then come from torch's RNG inside the graph).
    """
    op = "sample"
    _check_logits(op, logits)
    if logits.dim() not in (1, 2):
        raise ValueError(f"lmkern.{op}: logits must be 1-D (V,) or 2-D (B, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"lmkern.{op}: logits must have at least one token (V >= 1), got shape {tuple(logits.shape)}")
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"lmkern.{op}: return_logprobs must be a bool, got {return_logprobs!r}")
    ndim = logits.dim()
    x = logits.detach()
    x2d = x.reshape(1, -1) if ndim == 1 else x
    B, device = x2d.shape[0], x.device
    checks: list = []
    T, Ts = _per_row(op, "temperature", temperature, B, ndim, device, checks)
    k, ks = _per_row(op, "top_k", top_k, B, ndim, device, checks)
    p, ps = _per_row(op, "top_p", top_p, B, ndim, device, checks)
    m, ms = _per_row(op, "min_p", min_p, B, ndim, device, checks)
    s, seeds = _seeds(op, seed, generator, B, ndim, device)
    if B == 0:
        dispatch.requested_backend(backend)  # still reject a misspelled backend
        ids = x.new_empty((0,), dtype=torch.int64)
        return (ids, x.new_empty((0,), dtype=torch.float32)) if return_logprobs else ids
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _raise_bad_rows(op, checks)
    if x2d.shape[1] > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    _, run = dispatch.select(op, backend, sampling_ops.sampling_spec(x2d))
    ids, logprobs = run(x2d, T, k, p, m, Ts, ks, ps, ms, s, seeds, return_logprobs)
    if not compiling:
        bad = ids < 0
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"lmkern.{op}: logits row {r} contains NaN or +inf, or no finite value")
    if ndim == 1:
        ids = ids.reshape(())
        logprobs = logprobs.reshape(()) if return_logprobs else logprobs
    return (ids, logprobs) if return_logprobs else ids


def softmax(logits: Tensor, temperature: Union[float, Tensor] = 1.0, *, backend: Optional[str] = None) -> Tensor:
    """float32 ``softmax(logits / temperature)`` over the last dim, the distribution ``sample`` draws
    from before its filters. ``temperature == 0`` gives the one-hot of the first argmax (zero
    gradient), and so does a row without NaN or +inf whose largest logit over the temperature
    overflows float32 (the limit temperature -> 0). Differentiable with respect to logits
    (gradient in logits' dtype) and a tensor temperature.

    Args:
        logits: (..., V) floating point; float64 runs on the reference backend.
        temperature: a Python number >= 0, or a floating-point tensor of shape ``logits.shape[:-1]``
            (one temperature per row) or (); tensor values are not checked (no host sync).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides LMKERN_BACKEND.

    Returns:
        float32 probabilities with the logits' shape.
    """
    op = "softmax"
    _check_logits(op, logits)
    if logits.dim() == 0:
        raise ValueError(f"lmkern.{op}: logits must have at least one dimension (..., V), got a 0-d tensor")
    lead = tuple(logits.shape[:-1])
    B, V = math.prod(lead), logits.shape[-1]
    Ts = None
    if isinstance(temperature, Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"lmkern.{op}: temperature must be a float or a floating-point tensor, got a {temperature.dtype} tensor")
        if tuple(temperature.shape) not in (lead, ()):
            raise ValueError(
                f"lmkern.{op}: temperature must be a Python number or a tensor of shape {lead} (logits.shape[:-1]) "
                f"or (), got shape {tuple(temperature.shape)}"
            )
        Ts = temperature.to(device=logits.device, dtype=torch.float32).expand(lead).reshape(B).contiguous()
        T = 1.0
    elif isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        T = float(temperature)
        if not 0 <= T <= _F32_MAX:  # the kernels divide in float32, where a larger T is inf
            raise ValueError(
                f"lmkern.{op}: temperature must be >= 0 (0 gives one-hot) and at most {_F32_MAX:.7g} "
                f"(float32's largest), got {temperature!r}"
            )
    else:
        raise TypeError(f"lmkern.{op}: temperature must be a float or a floating-point tensor, got {temperature!r}")
    if logits.numel() == 0:
        dispatch.requested_backend(backend)
        return logits.float() * 0.0  # the right empty shape, still attached to the graph
    x2d = logits.reshape(B, V)
    if V > 1 and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    _, run = dispatch.select(op, backend, sampling_ops.sampling_spec(x2d))
    return run(x2d, T, Ts).reshape(logits.shape)


# ----------------------------------------------------------------------------- attention


def _check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"lmkern.{op}: {name} must be a bool, got {value!r}")
    return value


def _check_scale(op: str, name: str, value, head_dim: int) -> float:
    """The softmax scale as a float: ``value``, or 1/sqrt(head_dim) when None."""
    if value is None:
        if head_dim == 0:
            raise ValueError(f"lmkern.{op}: the head dimension is 0; pass an explicit {name}")
        return 1.0 / math.sqrt(head_dim)
    if type(value) is not float and (isinstance(value, (Tensor, bool)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"lmkern.{op}: {name} must be a float or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"lmkern.{op}: {name} must be finite, got {value!r}")
    return value


def _check_qkv(op: str, tensors: dict, ranks: Union[int, tuple[int, ...]], layout: str) -> None:
    """Type, dtype, device and rank of q/k/v-like tensors; the first one is the reference.
    ``ranks``: the allowed numbers of dims, or an int: at least that many."""
    first_name, first = next(iter(tensors.items()))
    if isinstance(first, Tensor):  # fast accept; the loops below name what is wrong
        dt, dev = first.dtype, first.device
        if dt.is_floating_point and all(
            isinstance(t, Tensor) and t.dtype == dt and t.device == dev
            and (t.dim() >= ranks if isinstance(ranks, int) else t.dim() in ranks)
            for t in tensors.values()
        ):
            return
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lmkern.{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"lmkern.{op}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise TypeError(f"lmkern.{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")
        if t.device != first.device:
            raise ValueError(f"lmkern.{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dim() < ranks if isinstance(ranks, int) else t.dim() not in ranks:
            want = f"at least {ranks}-D" if isinstance(ranks, int) else " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"lmkern.{op}: {name} must be {want} {layout}, got shape {tuple(t.shape)}")


def _check_heads(op: str, hq: int, hkv: int, k_name: str, gqa_hint: str = "") -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"lmkern.{op}: the number of key/value heads ({hkv}, in {k_name}) must divide the number of "
            f"query heads ({hq}){gqa_hint}"
        )


def _checking_values() -> bool:
    """Value checks that need a host sync (cu_seqlens, cache_seqlens) are skipped under torch.compile."""
    return not torch.compiler.is_compiling()


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention with torch.nn.functional.scaled_dot_product_attention's signature and semantics.

    ``softmax(query @ key^T * scale + mask) @ value`` over the last two dims, math in float32
    (float64 inputs in float64), output in query's dtype. The specification is
    lmkern/reference/attention.py (``sdpa``).

    Args:
        query: (..., Hq, L, D), floating point.
        key: (..., Hkv, S, D), value: (..., Hkv, S, Dv); same dtype, device and leading dims as
            query (no broadcasting of batch dims).
        attn_mask: optional, broadcastable to (..., Hq, L, S): bool (True = attend) or floating
            (added to the scaled scores; ``-inf`` masks a key). Not with ``is_causal``.
        dropout_p: in [0, 1]; dropout on the attention probabilities, drawn from torch's global
            RNG (reproducible with torch.manual_seed; no kernel's random stream).
        is_causal: torch's convention, aligned to the top left: query i attends keys j <= i,
            also when L != S.
        scale: defaults to 1/sqrt(D).
        enable_gqa: allow Hkv < Hq (Hkv must divide Hq; query head h reads head h // (Hq/Hkv)).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides
            LMKERN_BACKEND.

    Returns:
        (..., Hq, L, Dv) in query's dtype. A row that may attend no key (fully masked) is zeros,
        with zero gradients: lmkern's documented answer where some torch backends give NaN.
    """
    op = "scaled_dot_product_attention"
    _check_qkv(op, {"query": query, "key": key, "value": value}, 3, "(..., H, S, D)")
    q, k, v = query, key, value
    qs, ks, vs = q.shape, k.shape, v.shape  # read once: each .shape builds a torch.Size
    if not (len(qs) == len(ks) == len(vs)):
        raise ValueError(
            f"lmkern.{op}: query, key and value must have the same number of dims, got shapes "
            f"{tuple(qs)}, {tuple(ks)}, {tuple(vs)}"
        )
    lead = qs[:-3]
    for name, shape in (("key", ks), ("value", vs)):
        if shape[:-3] != lead:
            raise ValueError(f"lmkern.{op}: {name} must have query's leading (batch) dims {tuple(lead)}, got shape {tuple(shape)}")
    if ks[-1] != qs[-1]:
        raise ValueError(f"lmkern.{op}: key's head dim ({ks[-1]}) must equal query's ({qs[-1]})")
    if vs[-3] != ks[-3] or vs[-2] != ks[-2]:
        raise ValueError(
            f"lmkern.{op}: value must have key's heads and length (..., {ks[-3]}, {ks[-2]}, Dv), "
            f"got shape {tuple(vs)}"
        )
    enable_gqa = _check_bool(op, "enable_gqa", enable_gqa)
    is_causal = _check_bool(op, "is_causal", is_causal)
    hq, hkv = qs[-3], ks[-3]
    if not enable_gqa and hq != hkv:
        raise ValueError(
            f"lmkern.{op}: key has {hkv} heads and query {hq}; pass enable_gqa=True for grouped-query attention"
        )
    _check_heads(op, hq, hkv, "key")
    if type(dropout_p) is not float and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)):
        raise TypeError(f"lmkern.{op}: dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"lmkern.{op}: dropout_p must be in [0, 1], got {dropout_p!r}")
    scale = _check_scale(op, "scale", scale, qs[-1])
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"lmkern.{op}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"lmkern.{op}: attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"lmkern.{op}: attn_mask is on {attn_mask.device} but query is on {q.device}")
        if is_causal:
            raise ValueError(f"lmkern.{op}: pass attn_mask or is_causal=True, not both")
        target = tuple(lead) + (hq, qs[-2], ks[-2])
        try:
            ok = torch.broadcast_shapes(tuple(attn_mask.shape), target) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"lmkern.{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(..., Hq, L, S) = {target}"
            )
    spec = attention_ops.attention_spec(
        q, k, v, gqa=hq != hkv, mask=None if attn_mask is None else attn_mask.dtype, dropout=dropout_p > 0,
        mask_grad=attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled(),
    )
    _, run = dispatch.select(op, backend, spec)
    return run(q, k, v, attn_mask, float(dropout_p), is_causal, scale, enable_gqa)


def _check_cu_seqlens(op: str, name: str, cu: Tensor, total: int, total_name: str, device) -> int:
    """Validates one cu_seqlens tensor; returns its longest sequence (or -1 when not checked)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"lmkern.{op}: {name} must be an int32 Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"lmkern.{op}: {name} must be int32 (flash-attn's convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"lmkern.{op}: {name} must be 1-D of length B + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"lmkern.{op}: {name} is on {cu.device} but q is on {device}")
    if not _checking_values():
        return -1
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"lmkern.{op}: {name} must start at 0, got {name}[0] = {values[0]}")
    for b in range(len(values) - 1):
        if values[b + 1] < values[b]:
            raise ValueError(
                f"lmkern.{op}: {name} must be non-decreasing, got {name}[{b + 1}] = {values[b + 1]} < {name}[{b}] = {values[b]}"
            )
    if values[-1] != total:
        raise ValueError(f"lmkern.{op}: {name}[-1] = {values[-1]} must equal the number of packed rows of {total_name} ({total})")
    return max(values[b + 1] - values[b] for b in range(len(values) - 1))


def _check_max_seqlen(op: str, name: str, value, longest: int) -> Optional[int]:
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"lmkern.{op}: {name} must be an int or None, got {value!r}")
    if longest >= 0 and value < longest:
        raise ValueError(f"lmkern.{op}: {name} = {value} is less than the longest sequence ({longest})")
    return int(value)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    backend: Optional[str] = None,
):
    """Attention with flash-attn's conventions (flash_attn_func and flash_attn_varlen_func in one).

    Math in float32 (float64 inputs in float64), output in q's dtype; the specification is
    lmkern/reference/attention.py (``flash_attention``).

    Args:
        q: (B, Sq, Hq, D), or packed (total_q, Hq, D) with cu_seqlens.
        k, v: (B, Sk, Hkv, D), or packed (total_k, Hkv, D); same dtype and device as q. Hkv must
            divide Hq (GQA; Hkv == 1 is MQA): query head h reads head h // (Hq / Hkv).
        causal: flash-attn's convention, aligned to the bottom right: query i attends keys
            j <= i + Sk - Sq (per sequence when packed). With Sq > Sk the first Sq - Sk rows
            attend nothing: zeros, lse -inf.
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return the float32 log-sum-exp of the scaled scores per row,
            (B, Hq, Sq), or (Hq, total_q) when packed.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative sequence lengths, both or neither;
            0 first, non-decreasing, last = total rows. Sequence b is rows
            ``cu_seqlens[b]:cu_seqlens[b+1]``; each sequence attends only to itself.
        max_seqlen_q, max_seqlen_k: optional ints >= the longest sequence (kernels size their
            grids by them; the reference ignores them). Checked against cu_seqlens.
            The cu_seqlens checks read the tensors on the host (skipped under torch.compile;
            there a hint below the longest sequence costs time, never results: the kernels'
            programs stride over the blocks the grid does not cover).
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides
            LMKERN_BACKEND.

    Returns:
        out with q's shape and dtype, or ``(out, lse)`` with ``return_lse``.
    """
    op = "flash_attention"
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"lmkern.{op}: pass cu_seqlens_q and cu_seqlens_k together ({missing} is missing)")
    if varlen:
        _check_qkv(op, {"q": q, "k": k, "v": v}, (3,), "(total, H, D) when packed with cu_seqlens")
    else:
        _check_qkv(op, {"q": q, "k": k, "v": v}, (4,), "(B, S, H, D) (or pass cu_seqlens_q/cu_seqlens_k for packed sequences)")
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError(f"lmkern.{op}: max_seqlen_q/max_seqlen_k go with cu_seqlens_q/cu_seqlens_k (packed sequences)")
        for name, t in (("k", k), ("v", v)):
            if t.shape[0] != q.shape[0]:
                raise ValueError(f"lmkern.{op}: {name} must have q's batch size {q.shape[0]}, got shape {tuple(t.shape)}")
    D = q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != D:
            raise ValueError(f"lmkern.{op}: {name}'s head dim ({t.shape[-1]}) must equal q's ({D})")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"lmkern.{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_heads(op, q.shape[-2], k.shape[-2], "k")
    causal = _check_bool(op, "causal", causal)
    return_lse = _check_bool(op, "return_lse", return_lse)
    scale = _check_scale(op, "softmax_scale", softmax_scale, D)
    if varlen:
        longest_q = _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", q.device)
        longest_k = _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", q.device)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(
                f"lmkern.{op}: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
                f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
            )
        max_seqlen_q = _check_max_seqlen(op, "max_seqlen_q", max_seqlen_q, longest_q)
        max_seqlen_k = _check_max_seqlen(op, "max_seqlen_k", max_seqlen_k, longest_k)
    spec = attention_ops.attention_spec(q, k, v, gqa=q.shape[-2] != k.shape[-2], varlen=varlen, causal=causal)
    _, run = dispatch.select(op, backend, spec)
    out, lse = run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    return (out, lse) if return_lse else out


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Union[Tensor, int],
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    num_splits: int = 0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """New queries attending a key/value cache (decoding, chunked prefill), flash-attn's layout.

    Args:
        q: (B, Sq, Hq, D), floating point.
        k_cache, v_cache: (B, Smax, Hkv, D), q's dtype and device; Hkv divides Hq.
        cache_seqlens: int32 (B,) tensor, or a Python int for every row: row b attends the first
            ``cache_seqlens[b]`` entries of the cache (0 <= cache_seqlens[b] <= Smax; the new
            tokens' keys must already be written there). The range check reads the tensor on the
            host (skipped under torch.compile).
        causal: (default True) bottom-right within the prefix: query i attends keys
            j <= i + cache_seqlens[b] - Sq, so the last query sees the whole prefix.
        softmax_scale: defaults to 1/sqrt(D).
        num_splits: how many parts the split-KV decode kernels cut each row's cache into
            (flash-decoding); 0 (default) lets the kernel choose. It changes the order of the
            fp32 sums, not the math; backends without split-KV ignore it.
        backend: "auto" (default), "cuda", "triton", "cpu" or "reference"; overrides
            LMKERN_BACKEND.

    Returns:
        (B, Sq, Hq, D) in q's dtype; rows that attend no key are zeros.
    """
    op = "attention_with_kvcache"
    _check_qkv(op, {"q": q, "k_cache": k_cache, "v_cache": v_cache}, (4,), "(B, S, H, D)")
    B, Sq, Hq, D = q.shape
    if k_cache.shape[0] != B:
        raise ValueError(f"lmkern.{op}: k_cache must have q's batch size {B}, got shape {tuple(k_cache.shape)}")
    if k_cache.shape[-1] != D:
        raise ValueError(f"lmkern.{op}: k_cache's head dim ({k_cache.shape[-1]}) must equal q's ({D})")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"lmkern.{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    _check_heads(op, Hq, k_cache.shape[2], "k_cache")
    Smax = k_cache.shape[1]
    if _is_int(cache_seqlens):
        if not 0 <= cache_seqlens <= Smax:
            raise ValueError(f"lmkern.{op}: cache_seqlens = {cache_seqlens} must be in [0, {Smax}] (the cache length)")
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    elif not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"lmkern.{op}: cache_seqlens must be an int32 tensor of shape ({B},) or an int, got {cache_seqlens!r}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"lmkern.{op}: cache_seqlens must be int32 (flash-attn's convention), got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"lmkern.{op}: cache_seqlens must have shape ({B},) (one length per row), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"lmkern.{op}: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if _checking_values() and B > 0:
        bad = (cache_seqlens < 0) | (cache_seqlens > Smax)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"lmkern.{op}: cache_seqlens[{r}] = {int(cache_seqlens[r])} must be in [0, {Smax}] (the cache length)"
            )
    causal = _check_bool(op, "causal", causal)
    scale = _check_scale(op, "softmax_scale", softmax_scale, D)
    if not _is_int(num_splits):
        raise TypeError(f"lmkern.{op}: num_splits must be an int >= 0 (0 = the kernel's choice), got {num_splits!r}")
    if num_splits < 0:
        raise ValueError(f"lmkern.{op}: num_splits must be an int >= 0 (0 = the kernel's choice), got {num_splits!r}")
    spec = attention_ops.attention_spec(q, k_cache, v_cache, gqa=Hq != k_cache.shape[2], causal=causal)
    _, run = dispatch.select(op, backend, spec)
    return run(q, k_cache, v_cache, cache_seqlens, causal, scale, int(num_splits))
