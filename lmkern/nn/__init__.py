"""Drop-in modules: same constructors, parameters and state_dicts as the torch modules they replace."""

from lmkern.nn.norm import FusedAddLayerNorm, FusedAddRMSNorm, HFRMSNorm, LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm", "HFRMSNorm"]
