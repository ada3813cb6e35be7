"""lmkern: fused transformer kernels for PyTorch (Triton, CUDA, C++ CPU, pure-PyTorch reference).

Importing never fails and never initializes CUDA; see ``lmkern.info()`` for what is available.
"""

from lmkern import _ext, dispatch, ops  # noqa: F401  (ops: registers the custom ops)
from lmkern import nn  # noqa: F401
from lmkern.dispatch import BACKENDS, BackendError
from lmkern.functional import (
    attention_with_kvcache,
    flash_attention,
    layer_norm,
    rms_norm,
    sample,
    scaled_dot_product_attention,
    softmax,
)
from lmkern.generation import generate
from lmkern.info import info
from lmkern.patching import patch

__version__ = "0.1.0"

__all__ = [
    "layer_norm", "rms_norm", "sample", "softmax",
    "scaled_dot_product_attention", "flash_attention", "attention_with_kvcache",
    "generate", "patch", "info", "nn", "BACKENDS", "BackendError", "__version__",
]
