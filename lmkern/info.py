"""`lmkern info`: which backend can run which op, on which device and dtype, and why not."""

from __future__ import annotations

import torch

from lmkern import _ext, dispatch

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def backend_matrix() -> list[dict]:
    """One row per (op, device, dtype): each backend's reason (None = supported) and auto's pick."""
    rows = []
    for op in dispatch.ops():
        for device in DEVICES:
            for dtype in DTYPES:
                spec = dispatch.InputSpec(device, dtype, {"affine_dtypes": (dtype,)})
                why = dispatch.reasons(op, spec)
                auto = next((b for b in dispatch.preference(op, device) if why[b] is None), None)
                rows.append({"op": op, "device": device, "dtype": str(dtype).replace("torch.", ""), "reasons": why, "auto": auto})
    return rows


def info() -> str:
    """A printable report of the installation and the backend matrix."""
    b = _ext.build_info()
    cuda_dev = "not initialized"
    try:  # device_count does not create a CUDA context
        n = torch.cuda.device_count()
        cuda_dev = f"{n} device(s)" if n else "none"
    except Exception as e:  # pragma: no cover - broken driver
        cuda_dev = f"unavailable ({e})"
    lines = [
        f"lmkern {__import__('lmkern').__version__}  torch {b['torch']} (CUDA {b['torch_cuda']})  CUDA devices: {cuda_dev}",
        f"C++ extension: {'yes' if b['cpp_extension'] else 'no'}"
        + (f" (built for torch {b['cpp_built_for_torch']})" if b["cpp_built_for_torch"] else "")
        + (f", CPU kernels use {b['cpu_isa']}" if b["cpu_isa"] else ""),
        f"CUDA kernels:  {'yes' if b['cuda_extension'] else 'no'}",
        f"Triton:        {b['triton'] or 'no'}" + (" (interpreter, TRITON_INTERPRET=1)" if b["triton_interpret"] else ""),
        f"LMKERN_BACKEND={b['LMKERN_BACKEND'] or '(unset: auto)'}",
        "",
    ]
    notes: dict[str, int] = {}
    w = max([12] + [len(op) + 2 for op in dispatch.ops()])
    header = f"{'op':<{w}}{'device':<8}{'dtype':<10}" + "".join(f"{n:<11}" for n in dispatch.BACKENDS) + "auto"
    lines.append(header)
    for row in backend_matrix():
        cells = []
        for name in dispatch.BACKENDS:
            reason = row["reasons"][name]
            if reason is None:
                cells.append(f"{'yes':<11}")
            else:
                k = notes.setdefault(f"{name}: {reason}", len(notes) + 1)
                cells.append(f"{'no [' + str(k) + ']':<11}")
        lines.append(f"{row['op']:<{w}}{row['device']:<8}{row['dtype']:<10}" + "".join(cells) + (row["auto"] or "-"))
    lines.append("")
    lines += [f"[{k}] {text}" for text, k in notes.items()]
    return "\n".join(lines)
