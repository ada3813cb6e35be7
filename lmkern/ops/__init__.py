"""torch.library custom ops, one module per op family. Importing registers them."""

from lmkern.ops import norm  # noqa: F401
from lmkern.ops import sampling  # noqa: F401
from lmkern.ops import attention  # noqa: F401
