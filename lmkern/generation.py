"""Token-by-token generation over a Hugging Face causal LM with lmkern's fused sampler.

``generate`` runs the prompt once (prefill), then one token per step against the model's KV
cache, drawing each token with ``lmkern.sample``. Rows stop independently at an end-of-sequence
token and are padded from then on; the loop ends when every row has stopped. With
``temperature=0`` it produces what ``model.generate(do_sample=False)`` produces.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lmkern.functional import sample

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # odd constant: step seeds base + step * golden are all distinct


def _base_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    if seed is not None and generator is not None:
        raise ValueError("lmkern.generate: pass seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"lmkern.generate: seed must be an int, got {type(seed).__name__}")
        return seed & _MASK64
    gen_device = generator.device if generator is not None else "cpu"
    drawn = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=gen_device)
    return int(drawn.item()) & _MASK64


def _eos_tensor(eos_token_id, device) -> Optional[Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"lmkern.generate: eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _forward_kwargs(model) -> tuple[dict, str]:
    """Extra forward arguments, and the name the model gives its KV cache argument/output.

    Asks for the last position's logits only where the model supports it (saves an (S, V)
    matmul in the prefill). transformers >= 5.2x calls the cache `cache`, earlier versions
    `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        extra["num_logits_to_keep"] = 1
    cache_name = "cache" if "cache" in params else "past_key_values"
    return extra, cache_name


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    *,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_logprobs: bool = False,
    backend: Optional[str] = None,
):
    """Generates up to ``max_new_tokens`` tokens per row of ``input_ids`` (B, S).

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask, position_ids,
            cache=..., use_cache=True)`` returning ``.logits`` and ``.cache``; ``past_key_values``
            in transformers before 5.2x).
        input_ids: (B, S) int64 prompt; left-pad batched prompts and pass ``attention_mask``.
        temperature, top_k, top_p, min_p: as in ``lmkern.sample`` (``temperature=0`` is greedy).
        eos_token_id: a token id or a list of them; a row stops after producing one.
        pad_token_id: fills rows that have stopped (default: the first eos id, else 0).
        attention_mask: (B, S), 1 for prompt tokens, 0 for padding (default: all ones).
        seed / generator: reproducibility. Step t samples with the 64-bit key
            ``seed + t * 0x9E3779B97F4A7C15`` (row r on Philox stream r), so the same seed gives
            the same text on the same backend and device. With neither, the base key is drawn
            from torch's default generator.
        return_logprobs: also return (B, new) float32 log-probabilities of the chosen tokens
            under the model's unfiltered distribution (0 where a row had already stopped).
        backend: the sampler's backend (see ``lmkern.sample``).

    Returns:
        (B, S + new) int64 token ids, prompt included, like ``model.generate``; with
        ``return_logprobs``, a tuple (ids, logprobs).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("lmkern.generate: input_ids must be a (batch, sequence) int64 tensor")
    if input_ids.shape[1] == 0:
        raise ValueError("lmkern.generate: input_ids must hold at least one prompt token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"lmkern.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    device = input_ids.device
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"lmkern.generate: attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    eos = _eos_tensor(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    base = _base_seed(seed, generator)
    extra, cache_name = _forward_kwargs(model)

    # Positions count real tokens only, so left padding does not shift them (as transformers does).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)
    past = getattr(out, cache_name)
    logits = out.logits[:, -1, :]
    next_position = position_ids[:, -1:] + 1

    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, new_logprobs = [], []
    for step in range(max_new_tokens):
        step_seed = (base + step * _GOLDEN64) & _MASK64
        drawn = sample(
            logits, temperature, top_k, top_p, min_p, seed=step_seed, return_logprobs=return_logprobs, backend=backend
        )
        ids, logprobs = drawn if return_logprobs else (drawn, None)
        ids = torch.where(finished, torch.full_like(ids, pad_token_id), ids)
        new_tokens.append(ids)
        if return_logprobs:
            new_logprobs.append(torch.where(finished, torch.zeros_like(logprobs), logprobs))
        if eos is not None:
            finished |= torch.isin(ids, eos)
            if bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break  # the last token needs no forward pass
        attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=attention_mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=ids[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            use_cache=True,
            **{cache_name: past},
            **extra,
        )
        past = getattr(out, cache_name)
        logits = out.logits[:, -1, :]
        next_position = next_position + 1

    generated = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_empty((B, 0))
    result = torch.cat([input_ids, generated], dim=1)
    if return_logprobs:
        lp = torch.stack(new_logprobs, dim=1) if new_logprobs else torch.empty((B, 0), device=device)
        return result, lp
    return result
