"""``lmkern.patch(model)``: swap a model's normalization layers for lmkern's, in place."""

from __future__ import annotations

import torch

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
    """Hugging Face RMSNorm modules: LlamaRMSNorm-style (``weight`` and ``variance_epsilon``, output
    ``weight * normalized``) and Gemma-style (``weight`` and ``eps``, output ``(1 + weight) * normalized``)."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not name.endswith("RMSNorm") or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if hasattr(module, "variance_epsilon"):
        eps, offset = float(module.variance_epsilon), 0.0
    elif name.startswith("Gemma") and hasattr(module, "eps"):
        eps, offset = float(module.eps), 1.0
    else:
        return None
    new = lnn.HFRMSNorm(weight.shape[0], eps=eps, device="meta")
    new.weight = weight  # the same Parameter: optimizer state and tying survive
    new.weight_offset = offset
    new.train(module.training)
    return new


def patch(model: torch.nn.Module) -> int:
    """Replaces, in place, every torch.nn.LayerNorm / torch.nn.RMSNorm in ``model`` (and Hugging
    Face LlamaRMSNorm-style modules) with lmkern's, keeping their parameters. Returns how many
    modules were replaced. ``model`` itself is patched too when it is a norm layer."""
    new_root = _replacement(model)
    if new_root is not None and new_root is not model:
        raise TypeError(f"lmkern.patch: cannot replace the root module {type(model).__name__} in place; patch its parent")
    count = int(new_root is not None)
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
