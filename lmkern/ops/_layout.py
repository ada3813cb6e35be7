"""The one memory-layout requirement every lmkern kernel shares (norm rows, attention head
vectors, sampling logits): unit stride in the last dim, any other strides (0 included)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def unit_stride_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` itself when its last dim has unit stride (or at most one element), else a copy that
    has it (and stays in the autograd graph). An empty tensor is cloned with contiguous strides:
    its contiguous() would keep the strides, since it counts as contiguous already."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous() if t.numel() else t.clone(memory_format=torch.contiguous_format)


def contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    """For what kernels index as a plain array (weights, cu_seqlens, cache_seqlens, per-row
    parameters): a stride-0 or strided view becomes a dense copy."""
    return None if t is None else t.contiguous()
