"""Calling lmkern's custom ops without their autograd layer when no gradient can flow.

torch.library.register_autograd puts a Python function on the op's Autograd dispatch key. It
runs on every call, also under torch.no_grad() and on tensors that do not require grad, and
costs about 6 µs there (2-core CPU): as much as the kernel itself for a decode step's norm on
small tensors. ``below_autograd(op)`` skips it exactly when it would do nothing but forward the
call: grad mode off or no argument requiring grad, and no torch.compile tracing (graphs keep the
autograd-aware op, so compiled training works unchanged).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

_C = torch._C
# C++ check over the arguments (tensors, lists of tensors, anything else ignored); older torch
# builds may lack it.
_any_requires_grad = getattr(_C, "_any_requires_grad", None)
# Excludes the Autograd (and ADInplaceOrView) keys for the call: what torch.library's own
# no-grad path does after its Python bookkeeping.
_below_autograd_guard = _C._AutoDispatchBelowAutograd


def _needs_autograd(args: tuple) -> bool:
    if not _C.is_grad_enabled():
        return False
    if _any_requires_grad is not None:
        return _any_requires_grad(*args)
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


def below_autograd(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` (a torch.ops custom op), called straight below the Autograd dispatch key whenever no
    gradient can flow through the call; positional arguments only."""
    # The op's single overload: calling the packet resolves the overload on every call (~1 µs).
    op = getattr(op, "default", op)

    def call(*args):
        if torch.compiler.is_compiling() or _needs_autograd(args):  # compiling first: dynamo cannot trace the C check
            return op(*args)
        with _below_autograd_guard():
            return op(*args)

    call.op = op  # the wrapped op, for introspection and tests
    return call


def first_order_only(qualname: str) -> None:
    """Gives the backward op ``qualname`` (one defined in C++, which carries no autograd formula)
    an autograd formula that refuses to be differentiated. Without one, torch differentiates
    such an op as if it were constant, with only a warning: a double backward (create_graph=True,
    then a gradient of the gradient) through lmkern's kernels came out silently wrong. The ops
    defined in Python (Triton) raise torch's own error for this."""

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"{qualname} has no derivative: lmkern's kernels give first-order gradients only; for a "
            "gradient of a gradient use backend='reference'"
        )

    torch.library.register_autograd(qualname, refuse, setup_context=lambda ctx, inputs, output: None)
