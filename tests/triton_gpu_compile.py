"""Compile lmkern's Triton kernels for a CUDA architecture on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how the suite runs the kernels on CPU) never lowers a kernel
to PTX, so constructs that only the compiler rejects (types, layouts, loop-carried values, register
pressure) would first show on a GPU. This script calls the real launchers on meta tensors with
``wrap_triton`` replaced by a recorder, then compiles every recorded launch with
``triton.compile`` for the target architecture down to a cubin (Triton's bundled ptxas), and
prints one line per compiled kernel.

    python tests/triton_gpu_compile.py 90      # sm_90 (H100); 80 for sm_80 (A100)

Run by tests/test_triton_gpu_compile.py in a subprocess: it needs TRITON_INTERPRET unset at import.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmkern.kernels import norm as triton_norm  # noqa: E402
from lmkern.kernels import sampling as triton_sampling  # noqa: E402

LAUNCH_OPTIONS = ("num_warps", "num_stages")
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64"}

recorded: list[tuple[str, object, tuple, dict]] = []


class _Recorder:
    """Stands in for torch.library.wrap_triton: kernel[grid](*args, **kwargs) is recorded."""

    label = ""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: recorded.append((_Recorder.label, self.kernel, args, kwargs))


def _arg_type(value) -> str:
    if value is None:
        return "constexpr"
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def record_launches() -> None:
    """The launchers, on representative shapes and options, with meta tensors (nothing runs)."""
    triton_norm.wrap_triton = _Recorder
    triton_sampling.wrap_triton = _Recorder
    meta = dict(device="meta")

    def label(text):
        _Recorder.label = text

    for dtype, N, M in ((torch.float16, 4096, 64), (torch.bfloat16, 32768, 8)):  # single block, looped
        x = torch.empty(M, N, dtype=dtype, **meta)
        w = torch.empty(N, dtype=dtype, **meta)
        stats = torch.empty(M, dtype=torch.float32, **meta)
        for is_rms in (True, False):
            name = f"{'rms' if is_rms else 'layer'}_norm {dtype} N={N}"
            label(f"{name} fwd")
            triton_norm.norm_fwd(x, w, None if is_rms else w, x, torch.empty_like(x), torch.empty_like(x),
                                 None if is_rms else stats, stats, 1e-5, 0.0, is_rms)
            label(f"{name} bwd")
            triton_norm.norm_bwd(x, x, x, w, None if is_rms else stats, stats, torch.empty_like(x),
                                 torch.empty_like(w), None if is_rms else torch.empty_like(w), 0.0, is_rms)

    def rows(B, dtype):
        return torch.empty(B, dtype=dtype, **meta)

    for dtype, B, V in ((torch.bfloat16, 32, 128256), (torch.float32, 256, 97)):  # one row per program, batched rows
        logits = torch.empty(B, V, dtype=dtype, **meta)
        label(f"sample {dtype} V={V}, every filter per row")
        triton_sampling.sample(logits, 1.0, 0, 1.0, 0.0, rows(B, torch.float32), rows(B, torch.int64),
                               rows(B, torch.float32), rows(B, torch.float32), 0, rows(B, torch.int64),
                               rows(B, torch.int64), rows(B, torch.float32))
        label(f"sample {dtype} V={V}, scalar top-k 50 and top-p 0.9")
        triton_sampling.sample(logits, 0.8, 50, 0.9, 0.0, None, None, None, None, 2**40, None, rows(B, torch.int64), None)
        label(f"softmax {dtype} V={V}")
        triton_sampling.softmax(logits, 0.7, None, torch.empty(B, V, dtype=torch.float32, **meta))


def main(arch: int) -> int:
    record_launches()
    for text, kernel, args, kwargs in recorded:
        compiled = compile_launch(kernel, args, kwargs, arch)
        meta = compiled.metadata
        print(f"sm_{arch} {text}: ok, {getattr(meta, 'num_warps', '?')} warps, {len(compiled.asm['cubin'])} bytes of cubin",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
