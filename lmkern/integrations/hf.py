"""Hugging Face transformers integration: lmkern's attention as ``attn_implementation="lmkern"``.

    import lmkern.integrations.hf as lmkern_hf
    lmkern_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="lmkern")
    # or, on a loaded model: model.set_attn_implementation("lmkern")

``register()`` adds two entries to transformers' global registries, both under "lmkern":

* ``AttentionInterface``: :func:`attention_forward`, which runs ``lmkern.scaled_dot_product_attention``;
* ``AttentionMaskInterface``: transformers' own ``sdpa_mask``. transformers builds masks only for
  implementations that have a mask entry; without one it passes no mask at all, and padding would be
  silently ignored. sdpa's masks (bool, True = attend, (B, 1, Sq, Sk), or None when ``is_causal``
  covers it) are exactly what lmkern's sdpa takes.

Importing this module does not import transformers; ``register()`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lmkern import functional as F

NAME = "lmkern"

# Keyword arguments some models pass that change the attention math and that sdpa cannot express.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function interface (the one its sdpa integration implements).

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D), ``attention_mask`` from sdpa_mask (bool, True =
    attend) or a float additive mask, or None. Returns (output (B, Sq, Hq, D), None): no attention
    weights. Causality follows transformers' sdpa integration: ``is_causal`` (else the module's
    ``is_causal``) is used only when there is no mask and more than one query; a mask, when given,
    already holds the causal pattern. Fully masked query rows (e.g. left padding) give zeros.
    ``output_attentions=True`` gets no weights (None), as with sdpa; models passing ``softcap`` or
    attention sinks (``s_aux``/``sinks``) are refused rather than computed wrongly.
    """
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='lmkern' does not support `{name}`; use 'eager' for this model")
    hq, hkv = query.shape[1], key.shape[1]
    q_len = query.shape[2]
    # sdpa broadcasts the batch dim (e.g. learned queries with batch 1); lmkern's sdpa does not.
    if query.shape[0] != key.shape[0]:
        batch = max(query.shape[0], key.shape[0])
        query = query.expand(batch, *query.shape[1:])
        key = key.expand(batch, *key.shape[1:])
        value = value.expand(batch, *value.shape[1:])
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Decoding (one query) attends every cached key; a mask carries its own causal pattern.
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if is_causal and key.shape[2] > q_len:
        # Top-left causal never reads keys past q_len (prefill into an empty static cache).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, is_causal, q_len, key.shape[2])
        is_causal = False
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal, scale=scaling,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2).contiguous(), None


def _with_position_bias(bias: Tensor, mask: Optional[Tensor], is_causal: bool, q_len: int, k_len: int) -> Tensor:
    """A float additive mask: the position bias where attention is allowed, -inf elsewhere."""
    if mask is None:
        if not is_causal:
            return bias
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=bias.device).tril()
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def register() -> str:
    """Registers "lmkern" with transformers' AttentionInterface and AttentionMaskInterface.
    Idempotent (a later call sets the same two entries again). Returns the name to pass as
    ``attn_implementation``."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError("lmkern.integrations.hf.register() needs the transformers package") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_lmkern_attention(model) -> None:
    """Registers lmkern's attention and switches a loaded transformers model to it."""
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel (no set_attn_implementation)")
    model.set_attn_implementation(register())
