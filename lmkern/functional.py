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
from lmkern.ops import norm as norm_ops

ShapeLike = Union[int, Sequence[int], torch.Size]


def _normalized_shape(op: str, input: Tensor, normalized_shape: ShapeLike) -> tuple[int, ...]:
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
    return t.reshape(-1)


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
    if not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"lmkern.{op}: weight_offset must be a float, got {type(weight_offset).__name__}")
    x2d = input.reshape(m, n)
    r2d = residual.reshape(m, n) if residual is not None else None
    return shape, x2d, r2d


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
    out = out.reshape(input.shape)
    return (out, residual_out.reshape(input.shape)) if residual is not None else out


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
    out = out.reshape(input.shape)
    return (out, residual_out.reshape(input.shape)) if residual is not None else out
