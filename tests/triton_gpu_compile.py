"""Compile lmkern's Triton kernels for a CUDA architecture on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how the suite runs the kernels on CPU) never lowers a kernel
to PTX, so constructs that only the compiler rejects (types, layouts, loop-carried values, register
pressure) would first show on a GPU. This script calls the real launchers on meta tensors with
``wrap_triton`` replaced by a recorder, then compiles every recorded launch with
``triton.compile`` for the target architecture down to a cubin (Triton's bundled ptxas), checks
that each fits the architecture's shared memory per block, and prints one line per compiled kernel.

    python tests/triton_gpu_compile.py 90      # sm_90 (H100); 80 for sm_80 (A100)
    python tests/triton_gpu_compile.py 90 --regs   # also ptxas registers and spills per kernel

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

from attention_helpers import tile_pairs  # noqa: E402  (this script's directory, tests/, is on sys.path)
from lmkern.kernels import attention as triton_attention  # noqa: E402
from lmkern.kernels import norm as triton_norm  # noqa: E402
from lmkern.kernels import sampling as triton_sampling  # noqa: E402

LAUNCH_OPTIONS = ("num_warps", "num_stages")
# Shared memory one block may use (the opt-in maximum): above it the launch fails on the GPU with
# OutOfResources, which no compile step reports. sm_80: A100's 163 KB; sm_90: H100/H200's 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32"}

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


def launch_spec(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of a recorded launch: what its compiled binary depends on."""
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
    return signature, constexprs, {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    signature, constexprs, options = launch_spec(kernel, args, kwargs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def record_launches(arch: int) -> None:
    """The launchers, on representative shapes and options, with meta tensors (nothing runs)."""
    triton_norm.wrap_triton = _Recorder
    triton_sampling.wrap_triton = _Recorder
    triton_attention.wrap_triton = _Recorder
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
    B, V = 2, 128256  # the split path: every launch of one call (its search levels compile once)
    label(f"sample split rows bf16 V={V}, every filter per row")
    triton_sampling.sample(torch.empty(B, V, dtype=torch.bfloat16, **meta), 1.0, 0, 1.0, 0.0, rows(B, torch.float32),
                           rows(B, torch.int64), rows(B, torch.float32), rows(B, torch.float32), 0,
                           rows(B, torch.int64), rows(B, torch.int64), rows(B, torch.float32), splits=16)

    record_attention(label, meta, arch)


def record_attention(label, meta, arch: int) -> None:
    """Attention forward and backward on the head dims and features the tile configs distinguish
    (D <= 64, <= 128, 256; fp32's ieee dots; varlen; bias + seqused_k), and decoding, each with
    every autotune candidate (the TMA ones from sm_90 on)."""
    B, S, Hq, Hkv = 2, 1024, 16, 4
    i32 = torch.int32
    # (dtype, D, causal, varlen, bias + seqused_k, backward too)
    cases = (
        (torch.float16, 128, True, False, False, True),
        (torch.bfloat16, 64, True, True, False, True),
        (torch.float16, 256, True, False, False, True),
        (torch.float32, 80, False, False, True, True),
        (torch.bfloat16, 96, False, False, True, False),
        (torch.bfloat16, 64, False, False, False, False),  # D <= 64 dense: the warp-specialized tiles
    )
    for dtype, D, causal, varlen, masked, backward in cases:
        if varlen:
            q = torch.empty(B * S, Hq, D, dtype=dtype, **meta)
            k = torch.empty(B * S, Hkv, D, dtype=dtype, **meta)
            lse = torch.empty(Hq, B * S, dtype=torch.float32, **meta)
            cu = torch.empty(B + 1, dtype=i32, **meta)
        else:
            q = torch.empty(B, S, Hq, D, dtype=dtype, **meta)
            k = torch.empty(B, S, Hkv, D, dtype=dtype, **meta)
            lse = torch.empty(B, Hq, S, dtype=torch.float32, **meta)
            cu = None
        stats = torch.empty((2,) + lse.shape, dtype=torch.float32, **meta)
        bias = torch.empty(1, 1, S, S, **meta).expand(B, Hq, S, S) if masked else None
        seqused = torch.empty(B, dtype=i32, **meta) if masked else None
        args = (bias, cu, cu, seqused, S, S, causal, False, D**-0.5)
        name = f"attention {dtype} D={D}{' causal' if causal else ''}{' varlen' if varlen else ''}" \
               f"{' bias seqused_k' if masked else ''}"
        # Every autotune candidate (the default first): each must compile and fit, since the
        # GPU may pick any of them.
        for i, tile in enumerate(triton_attention.fwd_tiles(D, dtype, cpu=False, tma=arch >= 90, varlen=varlen,
                                                            bias=masked)):
            label(f"{name} fwd {_tile_text(tile, i)}")
            triton_attention.attention_fwd(q, k, k, *args, torch.empty_like(q), lse, stats, tile=tile)
        if backward:
            dkdv, dq = triton_attention.bwd_tiles(D, dtype, cpu=False)
            for dkdv_tile, dq_tile in tile_pairs(dkdv, dq):  # (the recorder drops repeated binaries)
                label(f"{name} bwd dkdv {_tile_text(dkdv_tile, dkdv.index(dkdv_tile))}, "
                      f"dq {_tile_text(dq_tile, dq.index(dq_tile))}")
                triton_attention.attention_bwd(q, q, k, k, q, stats, *args, torch.empty_like(q), torch.empty_like(k),
                                               torch.empty_like(k), dkdv_tile=dkdv_tile, dq_tile=dq_tile)
    for dtype, D, Sq in ((torch.float16, 128, 1), (torch.bfloat16, 256, 4), (torch.float32, 64, 1), (torch.float16, 64, 2)):
        q = torch.empty(8, Sq, 32, D, dtype=dtype, **meta)
        cache = torch.empty(8, 4096, 8, D, dtype=dtype, **meta)
        for i, tile in enumerate(triton_attention.decode_tiles(D, dtype, cpu=False)):
            label(f"attention_decode {dtype} D={D} Sq={Sq} {_tile_text(tile, i)}")
            triton_attention.attention_decode(q, cache, cache, torch.empty(8, dtype=i32, **meta), True, D**-0.5, 0,
                                              torch.empty_like(q), torch.empty(8, 32, Sq, dtype=torch.float32, **meta),
                                              tile=tile)


def _tile_text(tile, index: int) -> str:
    return f"{'default' if index == 0 else 'candidate'} {tuple(tile)}"


def ptxas_usage(compiled, arch: int) -> str:
    """", N registers, S bytes of spill stores/loads" from Triton's bundled ptxas -v on the kernel's
    PTX (the compile cache keeps no ptxas log, so it is run again; only with --regs)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    text = f", {regs.group(1) if regs else '?'} registers"
    if spills:
        text += f", {spills.group(1)}/{spills.group(2)} bytes spill stores/loads"
    return text


def main(arch: int, regs: bool = False) -> int:
    record_launches(arch)
    seen = set()
    over = 0
    for text, kernel, args, kwargs in recorded:
        spec = (kernel, repr(launch_spec(kernel, args, kwargs)))
        if spec in seen:  # the same binary again (launches that differ only in runtime scalars or
            continue      # share a kernel's config, as a backward's preprocess kernel)
        seen.add(spec)
        compiled = compile_launch(kernel, args, kwargs, arch)
        meta = compiled.metadata
        usage = ptxas_usage(compiled, arch) if regs else ""
        fits = meta.shared <= SHARED_LIMIT[arch]
        over += not fits
        verdict = "ok" if fits else f"TOO MUCH SHARED MEMORY (limit {SHARED_LIMIT[arch]})"
        print(f"sm_{arch} {text} [{getattr(kernel, '__name__', '?')}]: {verdict}, {getattr(meta, 'num_warps', '?')} warps, "
              f"{meta.shared} bytes of shared memory, {len(compiled.asm['cubin'])} bytes of cubin{usage}", flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    # python tests/triton_gpu_compile.py 90 [--regs]
    argv = [a for a in sys.argv[1:] if a != "--regs"]
    sys.exit(main(int(argv[0]) if argv else 90, "--regs" in sys.argv[1:]))
