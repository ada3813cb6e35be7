"""torch.library custom ops, one module per op family. Importing registers them."""

from lmkern.ops import norm  # noqa: F401
