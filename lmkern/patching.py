"""``lmkern.patch(model)``: swap a model's normalization layers (and, with ``attention=True``, its
attention) for lmkern's, in place."""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import Tensor
from torch.func import functional_call

from lmkern import nn as lnn


def _replacement(module: torch.nn.Module):
    """The lmkern module to use instead of ``module``, or None to leave it alone."""
    if isinstance(module, (lnn.LayerNorm, lnn.RMSNorm)):
        return None
    if type(module) is torch.nn.LayerNorm:
        module.__class__ = lnn.LayerNorm  # same attributes, parameters and hooks; new forward
        return module
    if type(module) is torch.nn.RMSNorm:
        module.__class__ = lnn.RMSNorm
        return module
    return _hf_rms_norm(module)


def _hf_rms_norm(module: torch.nn.Module):
    """Hugging Face RMSNorm modules (class name ending in ``RMSNorm``, one 1-D ``weight`` Parameter,
    no buffers, ``variance_epsilon`` or ``eps``, ``forward(hidden_states)``), recognized by what
    they compute rather than by name: Llama-style ``weight * normalized`` and Gemma-style
    ``(1 + weight) * normalized`` look alike from outside, and a family's next version may switch
    (Gemma 3n and Gemma 4 multiply by ``weight`` again). A module :func:`_probe_rms_norm` cannot
    match is left alone."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not name.endswith("RMSNorm") or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if [n for n, _ in module.named_parameters()] != ["weight"] or next(module.buffers(), None) is not None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return None  # extra arguments (a gate, a residual) that lmkern's module would not take
    found = _probe_rms_norm(module, float(eps), weight.shape[0])
    if found is None:
        return None
    offset, promotes = found
    new = lnn.HFRMSNorm(weight.shape[0], eps=float(eps), device="meta")
    new.weight = weight  # the same Parameter: optimizer state and tying survive
    new.weight_offset = offset
    new.promotes_dtype = promotes
    new.train(module.training)
    return new


def _probe_rms_norm(module: torch.nn.Module, eps: float, n: int) -> Optional[tuple[float, bool]]:
    """``(weight_offset, promotes_dtype)`` when ``module`` computes ``(offset + weight) * x /
    sqrt(mean(x**2) + eps)`` over the last dim with offset 0 or 1, else None. ``promotes_dtype``:
    whether a float32 weight on bfloat16 input gives float32 (Llama) or the input's dtype (Gemma).

    Runs the module's own forward on small float32 CPU inputs with a random CPU weight put in
    place of its own (``torch.func.functional_call``), so its parameters, device and mode are
    untouched and meta-device modules can be probed too. One probe row has a mean square near
    ``eps``, so an ``eps`` used elsewhere in the formula shows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, generator=gen)
    x = torch.randn(3, n, generator=gen) + 0.5
    x = torch.cat([x, x[:1] * math.sqrt(max(eps, 1e-12))])
    try:
        with torch.no_grad():
            got = functional_call(module, {"weight": weight}, (x,))
            low = functional_call(module, {"weight": weight}, (x.to(torch.bfloat16),))
    except Exception:  # whatever the forward needs that the probe lacks: not a module we know
        return None
    if not isinstance(got, Tensor) or not isinstance(low, Tensor) or got.shape != x.shape or low.shape != x.shape:
        return None
    x64 = x.double()
    normalized = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if torch.allclose(got.double(), normalized * (offset + weight.double()), rtol=1e-4, atol=1e-6):
            break
    else:
        return None
    if low.dtype not in (torch.float32, torch.bfloat16):
        return None
    return offset, low.dtype == torch.float32


def _patch_attention(model: torch.nn.Module) -> int:
    """torch.nn.MultiheadAttention modules become lmkern's (same attributes and parameters); a
    Hugging Face model is switched to ``attn_implementation="lmkern"``. Returns the modules swapped."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = lnn.MultiheadAttention
            count += 1
    # A transformers PreTrainedModel, recognized without importing transformers (lmkern never does
    # unless asked; a model that has this method means it is already imported).
    if callable(getattr(model, "set_attn_implementation", None)) and hasattr(model, "config"):
        from lmkern.integrations import hf

        hf.use_lmkern_attention(model)
    return count


def patch(model: torch.nn.Module, *, attention: bool = False) -> int:
    """Replaces, in place, every torch.nn.LayerNorm / torch.nn.RMSNorm in ``model`` (and Hugging
    Face RMSNorm modules whose math a probe confirms, see :func:`_hf_rms_norm`) with lmkern's, keeping their parameters. Returns how many
    modules were replaced. ``model`` itself is patched too when it is a norm layer.

    ``attention=True`` also swaps every torch.nn.MultiheadAttention for lmkern.nn.MultiheadAttention
    (counted; call them with ``need_weights=False`` for lmkern's attention) and, for a Hugging Face
    transformers model, registers lmkern's attention and calls
    ``model.set_attn_implementation("lmkern")`` (a setting, not a module: not counted)."""
    new_root = _replacement(model)
    if new_root is not None and new_root is not model:
        raise TypeError(f"lmkern.patch: cannot replace the root module {type(model).__name__} in place; patch its parent")
    count = int(new_root is not None)
    if attention:
        count += _patch_attention(model)
    replaced: dict[int, torch.nn.Module] = {}  # a module shared by several parents is replaced once
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, name, replaced[id(child)])
                continue
            new = _replacement(child)
            if new is not None:
                replaced[id(child)] = new
                if new is not child:
                    setattr(parent, name, new)
                count += 1
    return count
