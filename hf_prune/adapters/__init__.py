"""Model adapters: the decoder blocks, linears, norms and embeddings of each architecture, found from data."""

from .adapter import (
    LinearRef,
    ModelAdapter,
    WeightRef,
    get_submodule,
    in_features,
    is_linear,
    is_transposed,
    weight_out_in,
    zero_fraction,
)
from .experts import ExpertRef
from .table import (
    DEFAULT_EXCLUDED_ROLES,
    EXPERT_ROLES,
    FAMILIES,
    LINEAR_ROLES,
    NORM_ROLES,
    ROUTER_ROLE,
    VLM_FAMILIES,
    ArchSpec,
    ExpertLayout,
    MoESpec,
    VLMSpec,
)

__all__ = [
    "DEFAULT_EXCLUDED_ROLES",
    "EXPERT_ROLES",
    "ExpertLayout",
    "ExpertRef",
    "MoESpec",
    "ROUTER_ROLE",
    "WeightRef",
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
