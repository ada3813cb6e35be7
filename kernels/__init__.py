"""Triton kernels of lmkern, installed as ``lmkern.kernels``: @triton.jit kernels and thin launchers.

Importing this package needs Triton (lmkern._ext treats an ImportError as "no Triton backend") and
never touches a GPU. Triton decides when a kernel is decorated whether it runs compiled or in its
CPU interpreter (``TRITON_INTERPRET=1``), so ``INTERPRET`` records that decision at import.
"""

import triton

# The same switch @triton.jit reads at decoration time (the norm kernels are decorated just below).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

from . import norm  # noqa: E402,F401  (a broken kernel module removes the Triton backend, with its reason)
from . import sampling  # noqa: E402,F401
from . import attention  # noqa: E402,F401
