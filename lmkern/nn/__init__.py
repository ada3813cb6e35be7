"""Modules: drop-in normalization and multi-head attention modules (same constructors, parameters and
state_dicts as the torch modules they replace) and the Sampler head."""

from lmkern.nn.attention import MultiheadAttention
from lmkern.nn.norm import FusedAddLayerNorm, FusedAddRMSNorm, HFRMSNorm, LayerNorm, RMSNorm
from lmkern.nn.sampling import Sampler

__all__ = ["LayerNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm", "HFRMSNorm", "MultiheadAttention", "Sampler"]
