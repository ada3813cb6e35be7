"""Drop-in normalization modules.

``LayerNorm`` and ``RMSNorm`` subclass the torch modules and override only ``forward``, so the
constructor, defaults, parameter names, initialization, ``extra_repr`` and ``state_dict`` are
torch's own, ``isinstance(m, torch.nn.LayerNorm)`` holds, and ``load_state_dict`` works both
ways. The class attribute ``backend`` (None: LMKERN_BACKEND or auto) can be set per instance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lmkern import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by lmkern's fused kernels."""

    backend: Optional[str] = None

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by lmkern's fused kernels (``eps=None``: the dtype's epsilon)."""

    backend: Optional[str] = None

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class FusedAddLayerNorm(LayerNorm):
    """Pre-norm block helper: ``forward(x, residual)`` returns ``(layer_norm(x + residual), x + residual)``
    in one pass. Constructor and state_dict as torch.nn.LayerNorm."""

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return F.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual, backend=self.backend
        )


class FusedAddRMSNorm(RMSNorm):
    """Pre-norm block helper: ``forward(x, residual)`` returns ``(rms_norm(x + residual), x + residual)``
    in one pass. Constructor and state_dict as torch.nn.RMSNorm."""

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual, backend=self.backend)


class HFRMSNorm(RMSNorm):
    """Replacement for Hugging Face RMSNorm modules (a ``weight`` and a ``variance_epsilon`` or
    ``eps``), made by ``lmkern.patch``.

    ``weight_offset`` is 1.0 for Gemma-style ``(1 + weight)`` modules. The result has the
    promoted dtype of input and weight (a float32 weight on bfloat16 activations gives float32)
    like ``LlamaRMSNorm``, or with ``promotes_dtype = False`` the input's dtype like Gemma's.
    ``variance_epsilon`` stays readable.
    """

    weight_offset: float = 0.0
    promotes_dtype: bool = True

    @property
    def variance_epsilon(self) -> Optional[float]:
        return self.eps

    def forward(self, input: Tensor) -> Tensor:
        out = F.rms_norm(
            input, self.normalized_shape, self.weight, self.eps, weight_offset=self.weight_offset, backend=self.backend
        )
        return out.to(torch.promote_types(input.dtype, self.weight.dtype)) if self.promotes_dtype else out
