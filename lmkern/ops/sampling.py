"""Sampling and temperature softmax as torch.library custom ops, one pair per backend.

* cpu, cuda: ``lmkern::sample`` / ``lmkern::softmax``, schemas in csrc/registration.cpp, kernels
  registered per dispatch key by lmkern._C (csrc/cpu, csrc/cuda). Their fake implementations and
  the softmax autograd formula are registered here (registration.cpp names this module). The
  schema alone does not make a backend: each says "not built" unless lmkern._C actually holds a
  kernel for its dispatch key.
* triton: ``lmkern::sample_triton`` / ``lmkern::softmax_triton``, defined here with
  lmkern.ops._triton.define_triton_op around the launchers in lmkern.kernels.sampling (absent
  launchers leave the triton backend reporting why, they never break ``import lmkern``).
* reference: lmkern.reference.sampling (the specification); sample through the opaque custom op
  the opaque custom ops ``lmkern::sample_reference`` / ``lmkern::softmax_reference`` (see below).

Every op works on 2-D (B, V) logits with unit element stride; lmkern.functional validates the
user's arguments, converts per-row parameters and flattens shapes. ``sample`` is not
differentiable; ``softmax`` is, with respect to the logits and the per-row temperatures.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from lmkern import _ext, dispatch
from lmkern.ops._layout import unit_stride_last
from lmkern.ops._triton import define_triton_op
from lmkern.reference import sampling as reference

KERNEL_DTYPES = dispatch.LOW_PRECISION_KERNEL_DTYPES
OPS = ("sample", "softmax")


# ----------------------------------------------------------------------------- shared helpers


def _sample_outputs(logits: Tensor, need_logprobs: bool) -> tuple[Tensor, Tensor]:
    """(ids int64 (B,), logprobs fp32 (B,) or (0,)) as every sample op allocates them."""
    B = logits.shape[0]
    ids = logits.new_empty((B,), dtype=torch.int64)
    logprobs = logits.new_empty((B,) if need_logprobs else (0,), dtype=torch.float32)
    return ids, logprobs


def _check_2d(op: str, logits: Tensor, **rows: Optional[Tensor]) -> None:
    """The checks the C++ glue makes (csrc/sampling_glue.h), for the ops defined in Python."""
    if logits.dim() != 2:
        raise ValueError(f"lmkern.{op}: logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"lmkern.{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    B = logits.shape[0]
    for name, t in rows.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != B or t.device != logits.device):
            raise ValueError(f"lmkern.{op}: {name} must have shape ({B},) on {logits.device}, got {tuple(t.shape)} on {t.device}")


def _row_param(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


# ----------------------------------------------------------------------------- fake implementations


def _sample_fake(logits, temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps, seed, seeds, need_logprobs):
    return _sample_outputs(logits, need_logprobs)


def _softmax_fake(logits, temperature, temperatures):
    return logits.new_empty(logits.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------- C++ ops (cpu, cuda)

_HAS_SCHEMAS = _ext.HAS_CPP and all(hasattr(torch.ops.lmkern, name) for name in OPS)

if _HAS_SCHEMAS:
    torch.library.register_fake("lmkern::sample", _sample_fake)
    torch.library.register_fake("lmkern::softmax", _softmax_fake)


def _has_kernel(op: str, key: str) -> bool:
    return _HAS_SCHEMAS and torch._C._dispatch_has_kernel_for_dispatch_key(f"lmkern::{op}", key)


# Which compiled kernels lmkern._C registered, looked up once (lmkern._C is loaded before this
# module): the schemas exist in every build, a kernel only where its source was compiled in.
CPP_KERNELS: dict[tuple[str, str], bool] = {(op, key): _has_kernel(op, key) for op in OPS for key in ("CPU", "CUDA")}


# ----------------------------------------------------------------------------- Triton ops

TRITON_SAMPLING_ERROR: Optional[str] = None  # why the Triton sampling ops are missing, if they are
triton_sampling = None
if _ext.HAS_TRITON:
    try:
        triton_sampling = importlib.import_module("lmkern.kernels.sampling")
        missing = [n for n in OPS if not callable(getattr(triton_sampling, n, None))]
        if missing:
            triton_sampling = None
            TRITON_SAMPLING_ERROR = f"lmkern.kernels.sampling has no {' / '.join(missing)} launcher: not implemented"
    except ImportError as e:
        TRITON_SAMPLING_ERROR = f"Triton sampling kernels are not implemented in this installation ({e})"
    except Exception as e:  # a broken kernel module removes this backend only
        TRITON_SAMPLING_ERROR = f"lmkern.kernels.sampling failed to import ({type(e).__name__}: {e})"
else:
    TRITON_SAMPLING_ERROR = _ext.TRITON_ERROR

if triton_sampling is not None:

    @define_triton_op("lmkern::sample_triton", _sample_fake)
    def sample_triton(
        logits: Tensor,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        temperatures: Optional[Tensor],
        top_ks: Optional[Tensor],
        top_ps: Optional[Tensor],
        min_ps: Optional[Tensor],
        seed: int,
        seeds: Optional[Tensor],
        need_logprobs: bool,
    ) -> tuple[Tensor, Tensor]:
        _check_2d("sample_triton", logits, temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps, seeds=seeds)
        ids, logprobs = _sample_outputs(logits, need_logprobs)
        if logits.shape[0] == 0:
            return ids, logprobs
        if logits.shape[1] == 0:
            raise ValueError("lmkern.sample_triton: logits must have at least one column (V >= 1)")
        # scalars pass through unconverted: under torch.compile a dynamic seed is a SymInt, and
        # int() on it would specialize the graph to each new seed
        triton_sampling.sample(
            unit_stride_last(logits), temperature, top_k, top_p, min_p,
            _row_param(temperatures, torch.float32), _row_param(top_ks, torch.int64),
            _row_param(top_ps, torch.float32), _row_param(min_ps, torch.float32),
            seed, _row_param(seeds, torch.int64), ids, logprobs if need_logprobs else None,
        )
        return ids, logprobs

    @define_triton_op("lmkern::softmax_triton", _softmax_fake)
    def softmax_triton(logits: Tensor, temperature: float, temperatures: Optional[Tensor]) -> Tensor:
        _check_2d("softmax_triton", logits, temperatures=temperatures)
        probs = logits.new_empty(logits.shape, dtype=torch.float32)
        if probs.numel() == 0:
            return probs
        triton_sampling.softmax(unit_stride_last(logits), temperature, _row_param(temperatures, torch.float32), probs)
        return probs


# ----------------------------------------------------------------------------- softmax autograd


def _softmax_setup_context(ctx, inputs, output):
    logits, temperature, temperatures = inputs
    ctx.temperature = temperature
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(output, temperatures, logits)


def _softmax_backward(ctx, grad_probs):
    """p = softmax(z), z = x / T per row: dL/dz = p * (g - sum(g * p)), dL/dx = dL/dz / T and
    dL/dT = -sum(dL/dz * z) / T = -sum(dL/dz * x) / T^2; both zero where T == 0 (one-hot rows)."""
    probs, temperatures, logits = ctx.saved_tensors
    g = grad_probs.float()
    gz = probs * (g - (g * probs).sum(-1, keepdim=True))
    if temperatures is None:
        T = ctx.temperature
        gx = gz / T if T != 0 else torch.zeros_like(gz)
        return gx.to(ctx.logits_dtype), None, None
    T = temperatures.float()[:, None]
    greedy = T == 0
    T_safe = torch.where(greedy, torch.ones_like(T), T)
    gx = torch.where(greedy, torch.zeros_like(gz), gz / T_safe)
    grad_T = None
    if ctx.needs_input_grad[2]:
        # tokens with p == 0 (x = -inf among them) contribute nothing; masking avoids 0 * inf
        terms = torch.where(probs > 0, gz * logits.float(), torch.zeros_like(gz))
        # / T twice, not / T^2: T^2 underflows to 0 below T ~ 1e-23, where a one-hot row's zero
        # sum would give 0 / 0 = NaN
        grad_T = torch.where(greedy, torch.zeros_like(T), -terms.sum(-1, keepdim=True) / T_safe / T_safe)
        grad_T = grad_T.squeeze(1).to(temperatures.dtype)
    return gx.to(ctx.logits_dtype), None, grad_T


if _HAS_SCHEMAS:
    torch.library.register_autograd("lmkern::softmax", _softmax_backward, setup_context=_softmax_setup_context)
if triton_sampling is not None:
    torch.library.register_autograd("lmkern::softmax_triton", _softmax_backward, setup_context=_softmax_setup_context)


# ----------------------------------------------------------------------------- reference ops


@torch.library.custom_op("lmkern::sample_reference", mutates_args=())
def reference_sample(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    temperatures: Optional[Tensor],
    top_ks: Optional[Tensor],
    top_ps: Optional[Tensor],
    min_ps: Optional[Tensor],
    seed: int,
    seeds: Optional[Tensor],
    need_logprobs: bool,
) -> tuple[Tensor, Tensor]:
    """lmkern.reference.sampling.sample with the op's signature and outputs.

    An opaque custom op rather than plain PyTorch: Inductor folds a symbolic (dynamic) int seed
    into index arithmetic and then drops 32-bit masks of negative values (torch 2.13), which
    silently changes the Philox keys; opaque, the reference runs eagerly on the concrete seed.
    Sampling is not differentiable, so nothing is lost.
    """
    ids, logprobs = reference.sample(
        logits, temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps, seed, seeds
    )
    return ids, logprobs if need_logprobs else logprobs.new_empty(0)


reference_sample.register_fake(_sample_fake)


@torch.library.custom_op("lmkern::softmax_reference", mutates_args=())
def reference_softmax(logits: Tensor, temperature: float, temperatures: Optional[Tensor]) -> Tensor:
    """lmkern.reference.sampling.softmax as an op with the same autograd formula as the kernels
    (autograd through the plain formula gives a NaN temperature gradient at -inf logits)."""
    return reference.softmax(logits, temperature, temperatures)


reference_softmax.register_fake(_softmax_fake)
torch.library.register_autograd("lmkern::softmax_reference", _softmax_backward, setup_context=_softmax_setup_context)


# ----------------------------------------------------------------------------- dispatch


def sampling_spec(logits: Tensor) -> dispatch.InputSpec:
    return dispatch.InputSpec(dispatch.device_type(logits), logits.dtype)


def _dtype_support(spec: dispatch.InputSpec) -> Optional[str]:
    if spec.dtype not in KERNEL_DTYPES:
        return f"{spec.dtype} logits run on the reference backend (kernels take float32, float16, bfloat16)"
    return None


def _compiled_support(op: str, key: str):
    def supports(spec: dispatch.InputSpec) -> Optional[str]:
        if not CPP_KERNELS[(op, key)]:
            return (
                f"not built: lmkern._C has no {key} kernel for lmkern::{op} "
                "(it was built from sources without it; rebuild with `pip install --no-build-isolation .`)"
            )
        return _dtype_support(spec)

    return supports


def _triton_support(spec: dispatch.InputSpec) -> Optional[str]:
    if triton_sampling is None:
        return TRITON_SAMPLING_ERROR or "Triton sampling kernels are not implemented"
    if spec.device_type == "cpu" and spec.dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 incorrectly; bfloat16 Triton runs on CUDA only"
    return _dtype_support(spec)


def _reference_support(spec: dispatch.InputSpec) -> Optional[str]:
    return None if spec.dtype.is_floating_point else f"logits must be floating point, got {spec.dtype}"


def _op(name: str):
    """torch.ops.lmkern.<name>, or None when this installation lacks it (its backend says why)."""
    return getattr(torch.ops.lmkern, name) if hasattr(torch.ops.lmkern, name) else None


for _name, _ref in (("sample", reference_sample), ("softmax", reference_softmax)):
    dispatch.register(_name, "cpu", _compiled_support(_name, "CPU"), _op(_name) if CPP_KERNELS[(_name, "CPU")] else None)
    dispatch.register(_name, "cuda", _compiled_support(_name, "CUDA"), _op(_name) if CPP_KERNELS[(_name, "CUDA")] else None)
    dispatch.register(_name, "triton", _triton_support, _op(f"{_name}_triton") if triton_sampling is not None else None)
    dispatch.register(_name, "reference", _reference_support, _ref)
