"""Accuracy rules shared by the op tests."""

from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_2x(
    out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, what: str, term_scale: float = 0.0
) -> None:
    """The flash-attention rule: the kernel's error against a float64 reference is at most twice the
    error of PyTorch's own computation in the same precision, plus a floor so that exact results on
    both sides still pass: one unit in the last place at the reference's scale for 16-bit dtypes,
    where output rounding dominates. In float32 the error is dominated by summation order (the
    kernels reduce in a different order than torch, and small-N gradients cancel), so the floor is
    8 ulp of max(scale, 1); eps handling, which such a floor could hide, has tests of its own.

    ``term_scale`` is the size of the terms the computation rounds and cancels (a sum's sum of |terms|;
    a norm's input gradient, rstd * |grad * weight|). When the result is much smaller than its
    terms, float32 rounding of the terms sets the error whatever the order of operations, and
    torch's own error can be small by luck; the floor then covers 8 float32 ulp of that scale."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_lowp.dtype, f"{what}: dtype {out.dtype} != torch's {torch_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values where the reference is finite"
    err = max_abs_err(out, ref64)
    base = max_abs_err(torch_lowp, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    eps = torch.finfo(out.dtype).eps
    eps32 = torch.finfo(torch.float32).eps
    if out.dtype == torch.float32:
        floor = 8 * eps * max(scale, term_scale, 1.0)
    else:
        floor = eps * scale + 8 * eps32 * term_scale
    assert err <= 2 * base + floor, f"{what}: max error {err:.3g} > 2 x torch's {base:.3g} + {floor:.3g}"


class poisoned_empty:
    """Context manager: torch.empty (also at::empty in C++) returns NaN-filled memory, so an output
    element a kernel forgot to write shows up as NaN instead of passing by luck."""

    def __enter__(self):
        self._prev = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = self._prev[1]
