"""Pure-PyTorch LayerNorm/RMSNorm: the truth for tests and the last-resort backend.

Same contract as the ``lmkern::layer_norm_fwd`` / ``lmkern::rms_norm_fwd`` ops (see
csrc/registration.cpp): 2-D input (M, N), optional weight/bias of shape (N,), an optional fused
residual, statistics kept in float32 (float64 for float64 input). Differentiable by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _add_residual(x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Returns (h, residual_out): h = x + residual rounded to x's dtype, as unfused code does."""
    if residual is None:
        return x, x.new_empty(0)
    h = x + residual
    return h, h


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], weight_offset: float) -> Tensor:
    if weight is not None:
        y = y * (weight.to(y.dtype) + weight_offset)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def layer_norm_fwd(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    weight_offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, residual_out, mean, rstd) for LayerNorm over the last dim."""
    h, residual_out = _add_residual(input, residual)
    hf = h.to(_stat_dtype(input))
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    out = _affine((hf - mean) * rstd, weight, bias, weight_offset)
    return out.to(input.dtype), residual_out, mean.squeeze(-1), rstd.squeeze(-1)


def rms_norm_fwd(
    input: Tensor,
    weight: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    weight_offset: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, residual_out, rstd) for RMSNorm over the last dim."""
    h, residual_out = _add_residual(input, residual)
    hf = h.to(_stat_dtype(input))
    rstd = torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
    out = _affine(hf * rstd, weight, None, weight_offset)
    return out.to(input.dtype), residual_out, rstd.squeeze(-1)
