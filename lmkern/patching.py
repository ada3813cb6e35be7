"""``lmkern.patch(model)``: swap a model's normalization layers (and, with ``attention=True``, its
attention) for lmkern's, in place."""

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
    Face LlamaRMSNorm-style modules) with lmkern's, keeping their parameters. Returns how many
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
