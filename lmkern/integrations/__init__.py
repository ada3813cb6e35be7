"""Integrations with other libraries, each imported on demand (importing lmkern imports none of them).

* ``lmkern.integrations.hf``: ``register()`` makes ``attn_implementation="lmkern"`` available in
  Hugging Face transformers.
"""
