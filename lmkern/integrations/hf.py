"""Hugging Face transformers integration: lmkern's attention as ``attn_implementation="lmkern"``.

    import lmkern.integrations.hf as lmkern_hf
    lmkern_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="lmkern")
    # or, on a loaded model: model.set_attn_implementation("lmkern")

``register()`` adds two entries to transformers' global registries, both under "lmkern":

* ``AttentionInterface``: :func:`attention_forward`, which runs ``lmkern.scaled_dot_product_attention``;
* ``AttentionMaskInterface``: :func:`make_mask`, transformers' own ``sdpa_mask`` with one skip
  fewer. transformers builds masks only for implementations that have a mask entry; without one
  it passes no mask at all, and padding would be silently ignored. sdpa's masks (bool, True =
  attend, (B, 1, Sq, Sk), or None when ``is_causal`` covers it) are exactly what lmkern's sdpa
  takes.

Importing this module does not import transformers; ``register()`` does.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from lmkern import functional as F

NAME = "lmkern"

# Keyword arguments some models pass that change the attention math and that sdpa cannot express:
# logit soft-capping, attention sinks, and MiniMax-M3's sparse-attention key blocks (folded into
# the mask for "eager" and "sdpa" only, passed as a keyword to every other implementation).
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "block_indices")


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
    ``output_attentions=True`` gets no weights (None), as with sdpa. A sparse-attention key
    selection (``indices``) is folded into the mask as sdpa's models do it; models passing
    ``softcap``, attention sinks (``s_aux``/``sinks``) or key blocks (``block_indices``) are refused
    rather than computed wrongly.
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
    indices = kwargs.get("indices")
    k_len = key.shape[2]
    if is_causal and (k_len > q_len or indices is not None or position_bias is not None):
        # The causal pattern as a mask, for what is added to it below, or because sdpa's is_causal
        # would be wrong: no mask and fewer queries than keys happens, with make_mask() as the mask
        # function, only when a model cut its queries to the last positions after the mask was
        # skipped (Gemma 4's KV-shared layers with logits_to_keep > 1), so the diagonal is aligned
        # to the bottom right there (top-left, as sdpa's, otherwise: the same when Sq = Sk).
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(max(k_len - q_len, 0))
        is_causal = False
    if indices is not None:
        attention_mask = _with_selected_keys(indices, attention_mask, k_len, query.dtype)
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal, scale=scaling,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2).contiguous(), None


def _with_selected_keys(indices: Tensor, mask: Optional[Tensor], k_len: int, dtype) -> Tensor:
    """The mask restricted to the keys a sparse-attention indexer selected (``indices`` (B, Sq,
    top-k), DeepSeek V3.2 and its relatives), built as those models build it for "eager" and
    "sdpa" (they pass it as a keyword to every other implementation): the other keys become False
    in a bool mask, float's min in an additive one. No mask: every key allowed."""
    dropped = torch.ones(indices.shape[0], indices.shape[1], k_len, dtype=torch.bool, device=indices.device)
    dropped = dropped.scatter(-1, indices.long(), False).unsqueeze(1)  # (B, 1, Sq, Sk), True = not selected
    if mask is None:
        return ~dropped
    if mask.dtype == torch.bool:
        return mask & ~dropped
    return mask.masked_fill(dropped, torch.finfo(dtype).min)


def _with_position_bias(bias: Tensor, mask: Optional[Tensor]) -> Tensor:
    """A float additive mask: the position bias where attention is allowed, -inf elsewhere."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def make_mask(*args, **kwargs):
    """transformers' ``sdpa_mask``, except that it builds the mask where sdpa_mask would leave it to
    ``is_causal`` with fewer queries than keys (a prefill into an empty static cache). There sdpa's
    top-left diagonal is right, but the same call (no mask, fewer queries than keys) also reaches
    the attention function when a model cuts its queries to the last positions after the mask
    was made (Gemma 4), where it is wrong; transformers avoids that case only for the name
    "sdpa". The skip stays where every alignment agrees: one query, or as many queries as keys."""
    from transformers.masking_utils import sdpa_mask

    bound = inspect.signature(sdpa_mask).bind(*args, **kwargs)
    q_length, kv_length = bound.arguments["q_length"], bound.arguments["kv_length"]
    if q_length != 1 and q_length != kv_length:
        bound.arguments["allow_is_causal_skip"] = False
    return sdpa_mask(*bound.args, **bound.kwargs)


def register() -> str:
    """Registers "lmkern" with transformers' AttentionInterface and AttentionMaskInterface.
    Idempotent (a later call sets the same two entries again). Returns the name to pass as
    ``attn_implementation``."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError("lmkern.integrations.hf.register() needs the transformers package") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, make_mask)
    return NAME


def use_lmkern_attention(model) -> None:
    """Registers lmkern's attention and switches a loaded transformers model to it. Raises
    ValueError for a model that keeps its own attention (one not written against transformers'
    AttentionInterface, such as Falcon: transformers only logs a warning there)."""
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel (no set_attn_implementation)")
    model.set_attn_implementation(register())
    kept = getattr(getattr(model, "config", None), "_attn_implementation", NAME)
    if kept != NAME:
        raise ValueError(
            f"{type(model).__name__} kept attn_implementation={kept!r}: it does not take attention functions "
            "from transformers' AttentionInterface, so lmkern's attention cannot be used with it"
        )
