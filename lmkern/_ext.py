"""What this installation can run: the compiled extension and Triton, each loaded in try/except.

Importing this module never fails and never initializes CUDA: a missing piece only removes
backends, and the reason is kept for `lmkern info` and dispatch errors.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_CPP = False  # lmkern._C loaded: C++ CPU kernels (and their op schemas) are registered
HAS_CUDA_EXT = False  # lmkern._C was built with the CUDA kernels
CPP_ERROR: str | None = None
CPP_BUILT_FOR_TORCH: str | None = None  # the torch version lmkern._C was compiled against
CUDA_EXT_ERROR: str | None = None

if importlib.util.find_spec("lmkern._C") is None:
    CPP_ERROR = (
        "lmkern._C was not built (LMKERN_NO_EXT=1, or torch was not importable at build time); "
        "reinstall with `pip install --no-build-isolation .`"
    )
    CUDA_EXT_ERROR = CPP_ERROR
else:
    try:
        from lmkern import _C  # noqa: F401  (loading registers the C++ ops)

        HAS_CPP = True
        HAS_CUDA_EXT = bool(getattr(_C, "with_cuda", False))
        CPP_BUILT_FOR_TORCH = getattr(_C, "torch_version", None)
        if not HAS_CUDA_EXT:
            CUDA_EXT_ERROR = "lmkern._C was built without CUDA (no CUDA toolkit or a CPU-only torch at build time)"
    except Exception as e:  # e.g. undefined symbols after upgrading torch without rebuilding
        CPP_ERROR = (
            f"lmkern._C failed to load ({type(e).__name__}: {e}); rebuild it against this torch with "
            "`pip install --no-build-isolation .`"
        )
        CUDA_EXT_ERROR = CPP_ERROR

HAS_TRITON = False
TRITON_ERROR: str | None = None
TRITON_INTERPRET = False  # kernels were created by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)

try:
    import lmkern.kernels as _kernels

    HAS_TRITON = True
    TRITON_INTERPRET = bool(getattr(_kernels, "INTERPRET", False))
except Exception as e:
    TRITON_ERROR = f"Triton kernels are not available ({type(e).__name__}: {e})"


def build_info() -> dict:
    """A JSON-able summary of what is available, for `lmkern info` and benchmark results."""
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpp_extension": HAS_CPP,
        "cuda_extension": HAS_CUDA_EXT,
        "cpp_error": CPP_ERROR,
        "cpp_built_for_torch": CPP_BUILT_FOR_TORCH,
        "cpu_isa": _C.cpu_isa() if HAS_CPP and hasattr(_C, "cpu_isa") else None,
        "cuda_extension_error": CUDA_EXT_ERROR,
        "triton": triton_version,
        "triton_error": TRITON_ERROR,
        "triton_interpret": TRITON_INTERPRET,
        "LMKERN_BACKEND": os.environ.get("LMKERN_BACKEND"),
    }
