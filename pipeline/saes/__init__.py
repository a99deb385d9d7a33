"""SAE architectures: the shared skeleton in base.py, one file per architecture, registry.py."""

from pipeline.saes.base import SAE, ForwardOutput, SAEParams, SparseCode
from pipeline.saes.registry import ARCHITECTURES, load_sae

__all__ = ["ARCHITECTURES", "SAE", "ForwardOutput", "SAEParams", "SparseCode", "load_sae"]
