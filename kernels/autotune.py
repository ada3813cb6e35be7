"""Measured launch configs for the Triton kernels on a GPU.

A launcher hands ``choose`` its candidate configs (the hand-picked default first), a key naming
what the fastest config depends on, and a function that launches one config. The first call with
a new key times every candidate on the call's own tensors and keeps the fastest for the rest of
the process; later calls with the key launch it straight away.

Why not ``triton.autotune``: its key is a list of kernel arguments, so exact sequence lengths
would be retuned at every new length (the launchers bucket them instead), and it cannot measure
while torch.compile traces the launchers with fake tensors. Here, whenever nothing can be
measured (fake or CPU tensors, CUDA graph capture, LMKERN_AUTOTUNE=0), the launch uses the
config already measured for its key, else the default: a compiled graph keeps the config chosen
when it was traced.

A candidate the GPU cannot run (too much shared memory, a ptxas failure) is skipped; it is the
same failure Triton's own autotuner skips. The timing is short (a few ms per candidate): good
enough to tell tiles apart, and the cost is paid once per key.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Hashable, Sequence, TypeVar

import torch
from torch import Tensor

Config = TypeVar("Config")

# Per tuned key, every candidate's (config, ms), fastest first (inf: it could not run). The
# first entry, when finite, is the key's choice.
_timings: dict[Hashable, list[tuple[object, float]]] = {}


def _ranked(full_key: Hashable) -> list:
    """The configs measured for a key that ran, fastest first."""
    return [config for config, ms in _timings.get(full_key, ()) if not math.isinf(ms)]


def enabled() -> bool:
    """LMKERN_AUTOTUNE=0 turns measuring off (read at each call, so tests can switch it)."""
    return os.environ.get("LMKERN_AUTOTUNE", "1").strip() != "0"


def bucket(n: int, cap: int = 1 << 14) -> int:
    """n rounded up to a power of two, at most ``cap``: sizes that share a best config."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def _can_measure(probe: Tensor) -> bool:
    if probe.device.type != "cuda":
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(probe) or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


def _launch_errors() -> tuple[type, ...]:
    """The exceptions that mean "this config does not fit this GPU" (as triton.autotune skips)."""
    from triton.runtime import errors

    return tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name))


def measure_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of run() on the current CUDA stream (replaceable in tests)."""
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=2, rep=10, return_mode="median"))


def choose(key: Hashable, candidates: Sequence[Config], run: Callable[[Config], object], probe: Tensor,
           untimed_ok: Callable[[Config], bool] = lambda config: True) -> Config:
    """The config to launch: the fastest of ``candidates`` for ``key``, measured with run(config)
    (which launches it on the caller's tensors: its outputs are overwritten by the real launch
    that follows) the first time the key is seen on a device where measuring is possible.
    Where nothing can be measured, only configs with ``untimed_ok(config)`` are returned (the
    fastest measured such one, else the default)."""
    if len(candidates) == 1:
        return candidates[0]
    full_key = (key, str(probe.device))
    ranked = _ranked(full_key)
    if not (enabled() and _can_measure(probe)):
        return next((c for c in ranked if untimed_ok(c)), candidates[0])
    if ranked:
        return ranked[0]
    skip = _launch_errors()
    timings = []
    for config in candidates:
        try:
            ms = measure_ms(lambda: run(config))
        except skip:
            ms = math.inf
        timings.append((config, ms))
    _timings[full_key] = sorted(timings, key=lambda t: t[1])  # stable: ties keep the list's order
    # none ran (not remembered as a choice): the real launch raises the default's error
    return next(iter(_ranked(full_key)), candidates[0])


def chosen() -> dict[str, dict]:
    """What was measured so far: {key: {"config": best, "ms": [per-candidate timings]}} with
    printable keys (benchmarks record it beside their results)."""
    return {
        repr(key): {"config": repr(next(iter(_ranked(key)), None)), "ms": [(repr(c), ms) for c, ms in timings]}
        for key, timings in _timings.items()
    }


def reset() -> None:
    """Forgets every measured choice (tests)."""
    _timings.clear()


__all__ = ["bucket", "choose", "chosen", "enabled", "measure_ms", "reset"]
