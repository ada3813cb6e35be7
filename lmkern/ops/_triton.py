"""How lmkern defines its Triton custom ops (shared by every op family in lmkern/ops)."""

from __future__ import annotations

from typing import Callable

import torch

from lmkern import _ext


def define_triton_op(name: str, fake: Callable, mutates_args=()):
    """Decorator: ``torch.library.triton_op`` named ``name``, so torch.compile sees the Triton
    kernels inside; but under Triton's CPU interpreter an opaque ``torch.library.custom_op`` with
    the explicit ``fake`` implementation, because interpreted kernels cannot be traced with fake
    tensors (and Inductor could not run them anyway)."""

    def define(fn):
        if _ext.TRITON_INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)

    return define
