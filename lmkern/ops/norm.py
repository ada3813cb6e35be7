"""LayerNorm/RMSNorm as torch.library custom ops, one (forward, backward) pair per backend.

* cpu, cuda: ``lmkern::{layer,rms}_norm_{fwd,bwd}``, schemas in csrc/registration.cpp, kernels
  registered per dispatch key by lmkern._C (csrc/cpu, csrc/cuda). Their fake implementations are
  registered here (registration.cpp names this module for them).
* triton: ``lmkern::{layer,rms}_norm_{fwd,bwd}_triton``, defined here with torch.library.triton_op
  (lmkern.ops._triton.define_triton_op) around the launchers in lmkern.kernels.norm.
* reference: lmkern.reference.norm, plain differentiable PyTorch.

Autograd is registered on every forward op; its backward calls the same backend's backward op.
Every op works on 2-D (rows, hidden) inputs; lmkern.functional flattens the user's shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lmkern import _ext, dispatch
from lmkern.ops._fastpath import below_autograd, first_order_only
from lmkern.ops._layout import contiguous_or_none, unit_stride_last
from lmkern.ops._triton import define_triton_op
from lmkern.reference import norm as reference

KERNEL_DTYPES = dispatch.LOW_PRECISION_KERNEL_DTYPES


# ----------------------------------------------------------------------------- output allocation


def _fwd_outputs(x: Tensor, residual: Optional[Tensor], is_rms: bool):
    """(out, residual_out, mean, rstd) as every forward op allocates them; mean is None for rms."""
    M, N = x.shape
    out = x.new_empty((M, N))
    residual_out = x.new_empty((M, N)) if residual is not None else x.new_empty(0)
    mean = None if is_rms else x.new_empty((M,), dtype=torch.float32)
    return out, residual_out, mean, x.new_empty((M,), dtype=torch.float32)


def _bwd_outputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """(grad_input, grad_weight, grad_bias); absent parameters get empty gradients."""
    N = x.shape[1]
    dweight = weight.new_empty((N,)) if weight is not None else x.new_empty(0)
    dbias = bias.new_empty((N,)) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), dweight, dbias


def _check_2d(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]):
    """The checks the C++ glue makes (csrc/norm_glue.cpp), for the ops defined in Python."""
    if x.dim() != 2:
        raise ValueError(f"lmkern.{op}: input must be 2-D (rows, hidden), got shape {tuple(x.shape)}")
    N = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != N or t.device != x.device):
            raise ValueError(f"lmkern.{op}: {name} must have shape ({N},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device or residual.dtype != x.dtype):
        raise ValueError(
            f"lmkern.{op}: residual must match input ({tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
        )


# ----------------------------------------------------------------------------- fake implementations


def _layer_norm_fwd_fake(input, weight, bias, residual, eps, weight_offset):
    return _fwd_outputs(input, residual, is_rms=False)


def _rms_norm_fwd_fake(input, weight, residual, eps, weight_offset):
    out, residual_out, _, rstd = _fwd_outputs(input, residual, is_rms=True)
    return out, residual_out, rstd


def _layer_norm_bwd_fake(grad_out, grad_residual, input, weight, bias, mean, rstd, weight_offset):
    return _bwd_outputs(input, weight, bias)


def _rms_norm_bwd_fake(grad_out, grad_residual, input, weight, rstd, weight_offset):
    dx, dweight, _ = _bwd_outputs(input, weight, None)
    return dx, dweight


# ----------------------------------------------------------------------------- C++ ops (cpu, cuda)

if _ext.HAS_CPP:
    torch.library.register_fake("lmkern::layer_norm_fwd", _layer_norm_fwd_fake)
    torch.library.register_fake("lmkern::rms_norm_fwd", _rms_norm_fwd_fake)
    torch.library.register_fake("lmkern::layer_norm_bwd", _layer_norm_bwd_fake)
    torch.library.register_fake("lmkern::rms_norm_bwd", _rms_norm_bwd_fake)


# ----------------------------------------------------------------------------- Triton ops

if _ext.HAS_TRITON:
    from lmkern.kernels import norm as triton_norm

    @define_triton_op("lmkern::layer_norm_fwd_triton", _layer_norm_fwd_fake)
    def layer_norm_fwd_triton(
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        residual: Optional[Tensor],
        eps: float,
        weight_offset: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_2d("layer_norm_fwd_triton", input, weight, bias, residual)
        out, residual_out, mean, rstd = _fwd_outputs(input, residual, is_rms=False)
        triton_norm.norm_fwd(
            unit_stride_last(input), contiguous_or_none(weight), contiguous_or_none(bias), unit_stride_last(residual),
            out, residual_out if residual is not None else None, mean, rstd, eps, weight_offset, False,
        )
        return out, residual_out, mean, rstd

    @define_triton_op("lmkern::rms_norm_fwd_triton", _rms_norm_fwd_fake)
    def rms_norm_fwd_triton(
        input: Tensor,
        weight: Optional[Tensor],
        residual: Optional[Tensor],
        eps: float,
        weight_offset: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_2d("rms_norm_fwd_triton", input, weight, None, residual)
        out, residual_out, _, rstd = _fwd_outputs(input, residual, is_rms=True)
        triton_norm.norm_fwd(
            unit_stride_last(input), contiguous_or_none(weight), None, unit_stride_last(residual),
            out, residual_out if residual is not None else None, None, rstd, eps, weight_offset, True,
        )
        return out, residual_out, rstd

    @define_triton_op("lmkern::layer_norm_bwd_triton", _layer_norm_bwd_fake)
    def layer_norm_bwd_triton(
        grad_out: Tensor,
        grad_residual: Optional[Tensor],
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        rstd: Tensor,
        weight_offset: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_2d("layer_norm_bwd_triton", input, weight, bias, grad_residual)
        dx, dweight, dbias = _bwd_outputs(input, weight, bias)
        triton_norm.norm_bwd(
            unit_stride_last(grad_out), unit_stride_last(grad_residual), unit_stride_last(input),
            contiguous_or_none(weight), mean.contiguous(), rstd.contiguous(), dx,
            dweight if weight is not None else None, dbias if bias is not None else None, weight_offset, False,
        )
        return dx, dweight, dbias

    @define_triton_op("lmkern::rms_norm_bwd_triton", _rms_norm_bwd_fake)
    def rms_norm_bwd_triton(
        grad_out: Tensor,
        grad_residual: Optional[Tensor],
        input: Tensor,
        weight: Optional[Tensor],
        rstd: Tensor,
        weight_offset: float,
    ) -> tuple[Tensor, Tensor]:
        _check_2d("rms_norm_bwd_triton", input, weight, None, grad_residual)
        dx, dweight, _ = _bwd_outputs(input, weight, None)
        triton_norm.norm_bwd(
            unit_stride_last(grad_out), unit_stride_last(grad_residual), unit_stride_last(input),
            contiguous_or_none(weight), None, rstd.contiguous(), dx,
            dweight if weight is not None else None, None, weight_offset, True,
        )
        return dx, dweight


# ----------------------------------------------------------------------------- autograd


def _register_layer_norm_autograd(fwd: str, bwd: str) -> None:
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, _eps, weight_offset = inputs
        _out, residual_out, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.weight_offset = weight_offset
        ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, bias, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        dres = grad_residual_out if ctx.has_residual else None
        dx, dweight, dbias = getattr(torch.ops.lmkern, bwd)(grad_out, dres, h, weight, bias, mean, rstd, ctx.weight_offset)
        return (
            dx,
            dweight if weight is not None else None,
            dbias if bias is not None else None,
            dx if ctx.has_residual else None,
            None,
            None,
        )

    torch.library.register_autograd(f"lmkern::{fwd}", backward, setup_context=setup_context)


def _register_rms_norm_autograd(fwd: str, bwd: str) -> None:
    def setup_context(ctx, inputs, output):
        x, weight, residual, _eps, weight_offset = inputs
        _out, residual_out, rstd = output
        ctx.has_residual = residual is not None
        ctx.weight_offset = weight_offset
        ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    def backward(ctx, grad_out, grad_residual_out, _grad_rstd):
        h, weight, rstd = ctx.saved_tensors
        dres = grad_residual_out if ctx.has_residual else None
        dx, dweight = getattr(torch.ops.lmkern, bwd)(grad_out, dres, h, weight, rstd, ctx.weight_offset)
        return dx, dweight if weight is not None else None, dx if ctx.has_residual else None, None, None

    torch.library.register_autograd(f"lmkern::{fwd}", backward, setup_context=setup_context)


if _ext.HAS_CPP:
    _register_layer_norm_autograd("layer_norm_fwd", "layer_norm_bwd")
    _register_rms_norm_autograd("rms_norm_fwd", "rms_norm_bwd")
    first_order_only("lmkern::layer_norm_bwd")
    first_order_only("lmkern::rms_norm_bwd")
if _ext.HAS_TRITON:
    _register_layer_norm_autograd("layer_norm_fwd_triton", "layer_norm_bwd_triton")
    _register_rms_norm_autograd("rms_norm_fwd_triton", "rms_norm_bwd_triton")


# ----------------------------------------------------------------------------- dispatch


def norm_spec(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> dispatch.InputSpec:
    affine = tuple(t.dtype for t in (weight, bias) if t is not None)
    return dispatch.InputSpec(dispatch.device_type(x), x.dtype, {"affine_dtypes": affine})


def _kernel_support(spec: dispatch.InputSpec) -> Optional[str]:
    """What the compiled and Triton kernels accept (shared by cpu, cuda and triton)."""
    if spec.dtype not in KERNEL_DTYPES:
        return f"{spec.dtype} input runs on the reference backend (kernels take float32, float16, bfloat16)"
    affine = spec.extra.get("affine_dtypes", ())
    if len(set(affine)) > 1:
        return f"weight and bias dtypes differ ({affine[0]} vs {affine[1]})"
    if affine and affine[0] not in (spec.dtype, torch.float32):
        return f"weight/bias dtype {affine[0]} must be float32 or the input's dtype {spec.dtype}"
    return None


def _triton_support(spec: dispatch.InputSpec) -> Optional[str]:
    if spec.device_type == "cpu" and spec.dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 incorrectly; bfloat16 Triton runs on CUDA only"
    return _kernel_support(spec)


def _reference_support(spec: dispatch.InputSpec) -> Optional[str]:
    return None if spec.dtype.is_floating_point else f"input must be floating point, got {spec.dtype}"


def _op(name: str):
    """torch.ops.lmkern.<name> (without its autograd layer when no gradient can flow), or None
    when this installation lacks it (its backend then reports why)."""
    return below_autograd(getattr(torch.ops.lmkern, name)) if hasattr(torch.ops.lmkern, name) else None


for _family in ("layer_norm", "rms_norm"):
    dispatch.register(_family, "cpu", _kernel_support, _op(f"{_family}_fwd"))
    dispatch.register(_family, "cuda", _kernel_support, _op(f"{_family}_fwd"))
    dispatch.register(_family, "triton", _triton_support, _op(f"{_family}_fwd_triton"))
    dispatch.register(_family, "reference", _reference_support, getattr(reference, f"{_family}_fwd"))
