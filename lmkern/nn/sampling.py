"""A sampling head: ``Sampler(temperature, top_k, top_p, min_p)(logits)`` draws one token per row."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lmkern import functional as F


class Sampler(torch.nn.Module):
    """Holds sampling settings and calls :func:`lmkern.sample` on the logits it is given.

    The settings are plain attributes (no parameters or buffers, so nothing enters the
    state_dict) and may be changed between calls; each is what ``lmkern.sample`` accepts: a
    Python number, None (disabled filter) or a per-row tensor. Python numbers are checked here,
    tensors at each call. The class attribute ``backend`` (None: LMKERN_BACKEND or auto) can be
    set per instance.
    """

    backend: Optional[str] = None

    def __init__(
        self,
        temperature: Union[float, Tensor] = 1.0,
        top_k: Union[int, Tensor, None] = None,
        top_p: Union[float, Tensor, None] = None,
        min_p: Union[float, Tensor, None] = None,
    ):
        super().__init__()
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
            if not isinstance(value, Tensor):
                F._per_row("nn.Sampler", name, value, 1, 2, "cpu", [])  # raises on a bad setting
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p

    def forward(
        self,
        logits: Tensor,
        seed: Union[int, Tensor, None] = None,
        generator: Optional[torch.Generator] = None,
        return_logprobs: bool = False,
    ):
        """ids (B,) int64, or ``(ids, logprobs)``; see :func:`lmkern.sample` for every argument."""
        return F.sample(
            logits,
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            seed=seed,
            generator=generator,
            return_logprobs=return_logprobs,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        def show(v):
            return f"tensor(shape={tuple(v.shape)})" if isinstance(v, Tensor) else repr(v)

        return ", ".join(f"{n}={show(getattr(self, n))}" for n in ("temperature", "top_k", "top_p", "min_p"))
