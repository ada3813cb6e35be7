"""Pure-PyTorch implementations of every lmkern op: the truth for tests, the last fallback."""

from lmkern.reference import norm  # noqa: F401
from lmkern.reference import attention  # noqa: F401
