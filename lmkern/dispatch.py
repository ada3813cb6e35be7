"""Backend selection: cuda, triton, cpu, reference.

Every op family registers, per backend, a ``supports(spec)`` function that returns ``None`` when
the backend can run inputs described by ``spec`` and otherwise a short reason, and the callable
to run. ``select`` resolves the requested backend:

* ``backend=`` argument, else the ``LMKERN_BACKEND`` environment variable, else ``"auto"``;
* ``"auto"`` tries the backends in the preference order for the inputs' device and takes the
  first that supports them (CUDA tensors: by measured speed, see ``CUDA_PREFERENCE``; CPU
  tensors: the C++ kernels, then the reference);
* a named backend that cannot run the inputs raises ``BackendError`` listing every backend's
  reason, so the user sees what would have worked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lmkern import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Order tried by "auto" on CUDA tensors, per op. It is set from measured speed (benchmarks/results);
# ops without GPU measurements yet use DEFAULT_CUDA_PREFERENCE, except attention: no GPU has run
# its kernels yet, and the Triton ones are the ones CI executes (through the interpreter), while
# the CUDA ones are only compiled there; so Triton goes first until a GPU run measures both.
_ATTENTION_UNMEASURED = ("triton", "cuda", "reference")
CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {
    op: _ATTENTION_UNMEASURED for op in ("scaled_dot_product_attention", "flash_attention", "attention_with_kvcache")
}
DEFAULT_CUDA_PREFERENCE = ("cuda", "triton", "reference")
# Triton on CPU tensors only runs in the interpreter, far slower than C++: auto never picks it.
CPU_PREFERENCE = ("cpu", "reference")
OTHER_DEVICE_PREFERENCE = ("reference",)

LOW_PRECISION_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(ValueError):
    """The requested backend cannot run these inputs; the message lists every backend's reason."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs more per call
class InputSpec:
    """What backends need to know to accept or decline a call (no tensors, so `lmkern info` can
    ask about devices this machine does not have). Treat it as immutable."""

    device_type: str
    dtype: torch.dtype
    extra: dict = field(default_factory=dict, compare=False)

    def key(self) -> tuple:
        """Everything a backend's ``supports`` may read, as a hashable value (``extra``'s items in
        the order its builder inserts them)."""
        return (self.device_type, self.dtype, tuple(self.extra.items()))


@dataclass(frozen=True)
class _Impl:
    supports: Callable[[InputSpec], Optional[str]]
    run: Callable[..., Any]


def device_type(t: torch.Tensor) -> str:
    """``t.device.type``, without building a torch.device for the common devices (~0.5 µs)."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


_REGISTRY: dict[str, dict[str, _Impl]] = {}
# Backends already chosen, by (op, requested backend, spec key): ``supports`` depends on the spec
# alone, so a spec seen before gets the same answer, without the support checks (a few µs a call,
# which add up at decode, where every op is small). Only successes are kept: a failure raises,
# with every backend's reason, each time. register() clears it.
_CHOSEN: dict[tuple, str] = {}


def register(op: str, backend: str, supports: Callable[[InputSpec], Optional[str]], run: Callable[..., Any]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(supports, run)
    _CHOSEN.clear()


def implementation(op: str, backend: str) -> Callable[..., Any]:
    """The callable ``backend`` registered for ``op`` (no support check)."""
    return _REGISTRY[op][backend].run


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backend_available(backend: str) -> Optional[str]:
    """Why ``backend`` is missing from this installation, or None if it is present."""
    if backend == "cuda":
        return None if _ext.HAS_CUDA_EXT else _ext.CUDA_EXT_ERROR
    if backend == "cpu":
        return None if _ext.HAS_CPP else _ext.CPP_ERROR
    if backend == "triton":
        return None if _ext.HAS_TRITON else _ext.TRITON_ERROR
    return None


def device_support(backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run tensors on ``device_type`` (None if it can)."""
    missing = backend_available(backend)
    if missing:
        return missing
    if backend == "cuda" and device_type != "cuda":
        return f"input is on {device_type}, the cuda backend needs CUDA tensors"
    if backend == "cpu" and device_type != "cpu":
        return f"input is on {device_type}, the cpu backend needs CPU tensors"
    if backend == "triton" and device_type != "cuda":
        if device_type == "cpu" and _ext.TRITON_INTERPRET:
            return None
        return (
            f"input is on {device_type}; Triton runs CUDA tensors, or CPU tensors through its "
            "interpreter when TRITON_INTERPRET=1 is set before lmkern is imported"
        )
    return None


def reasons(op: str, spec: InputSpec) -> dict[str, Optional[str]]:
    """For every backend: None if it can run ``spec``, else why not."""
    impls = _REGISTRY[op]
    out = {}
    for name in BACKENDS:
        if name not in impls:
            out[name] = f"no {name} implementation of {op}"
        else:
            out[name] = device_support(name, spec.device_type) or impls[name].supports(spec)
    return out


def preference(op: str, device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return CUDA_PREFERENCE.get(op, DEFAULT_CUDA_PREFERENCE)
    if device_type == "cpu":
        return CPU_PREFERENCE
    return OTHER_DEVICE_PREFERENCE


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else LMKERN_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get("LMKERN_BACKEND", "auto")
    if not isinstance(name, str) or (name not in BACKENDS and name != "auto"):
        where = "backend" if backend is not None else "LMKERN_BACKEND"
        raise ValueError(f"{where} must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


def _format(op: str, spec: InputSpec, why: dict[str, Optional[str]]) -> str:
    lines = [f"  {name}: {reason or 'can run these inputs'}" for name, reason in why.items()]
    return f"lmkern.{op} on {spec.device_type} {spec.dtype}:\n" + "\n".join(lines)


def select(op: str, backend: Optional[str], spec: InputSpec) -> tuple[str, Callable[..., Any]]:
    """Returns (backend name, callable) for ``op`` on inputs described by ``spec``."""
    name = requested_backend(backend)
    if torch.compiler.is_compiling():  # traced once per graph; a global memo would only add guards
        return _select(op, name, spec)
    memo = (op, name, spec.key())
    try:
        chosen = _CHOSEN.get(memo)
    except TypeError:  # an unhashable extra: decide afresh
        return _select(op, name, spec)
    if chosen is None:
        chosen = _CHOSEN[memo] = _select(op, name, spec)[0]
    return chosen, _REGISTRY[op][chosen].run


def _select(op: str, name: str, spec: InputSpec) -> tuple[str, Callable[..., Any]]:
    impls = _REGISTRY[op]
    if name != "auto":
        impl = impls.get(name)
        why = device_support(name, spec.device_type) or (
            impl.supports(spec) if impl else f"no {name} implementation of {op}"
        )
        if why is None:
            return name, impl.run
        raise BackendError(f"backend {name!r} cannot run these inputs. " + _format(op, spec, reasons(op, spec)))
    for candidate in preference(op, spec.device_type):
        impl = impls.get(candidate)
        if impl is not None and device_support(candidate, spec.device_type) is None and impl.supports(spec) is None:
            return candidate, impl.run
    raise BackendError("no backend can run these inputs. " + _format(op, spec, reasons(op, spec)))
