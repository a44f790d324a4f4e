"""Model adapters: the decoder blocks, linears, norms and embeddings of each architecture, found from data."""

from .adapter import (
    LinearRef,
    ModelAdapter,
    get_submodule,
    in_features,
    is_linear,
    is_transposed,
    weight_out_in,
    zero_fraction,
)
from .table import FAMILIES, LINEAR_ROLES, NORM_ROLES, VLM_FAMILIES, ArchSpec, VLMSpec

__all__ = [
    "FAMILIES",
    "LINEAR_ROLES",
    "NORM_ROLES",
    "ArchSpec",
    "VLMSpec",
    "VLM_FAMILIES",
    "LinearRef",
    "zero_fraction",
    "ModelAdapter",
    "get_submodule",
    "in_features",
    "is_linear",
    "is_transposed",
    "weight_out_in",
]
