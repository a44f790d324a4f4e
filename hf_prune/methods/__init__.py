"""Built-in pruning methods, one folder each; ``hf_prune.registry`` registers them by name (``BUILTIN_METHODS``)."""

from .depth import DepthConfig, DepthMethod
from .experts import ExpertsConfig, ExpertsMethod
from .magnitude import MagnitudeConfig, MagnitudeMethod
from .shrink import ShrinkConfig, ShrinkMethod
from .slicegpt import SliceGPTConfig, SliceGPTMethod
from .sparsegpt import SparseGPTConfig, SparseGPTMethod
from .visual_tokens import VisualTokensConfig, VisualTokensMethod
from .wanda import WandaConfig, WandaMethod
from .width import WidthConfig, WidthMethod

# (name in recipes, config class, method class)
BUILTIN_METHODS = (
    ("magnitude", MagnitudeConfig, MagnitudeMethod),
    ("wanda", WandaConfig, WandaMethod),
    ("sparsegpt", SparseGPTConfig, SparseGPTMethod),
    ("depth", DepthConfig, DepthMethod),
    ("experts", ExpertsConfig, ExpertsMethod),
    ("slicegpt", SliceGPTConfig, SliceGPTMethod),
    ("visual_tokens", VisualTokensConfig, VisualTokensMethod),
    ("width", WidthConfig, WidthMethod),
    ("shrink", ShrinkConfig, ShrinkMethod),
)

__all__ = [
    "BUILTIN_METHODS",
    "DepthConfig",
    "DepthMethod",
    "ExpertsConfig",
    "ExpertsMethod",
    "MagnitudeConfig",
    "MagnitudeMethod",
    "ShrinkConfig",
    "ShrinkMethod",
    "SliceGPTConfig",
    "SliceGPTMethod",
    "SparseGPTConfig",
    "SparseGPTMethod",
    "VisualTokensConfig",
    "VisualTokensMethod",
    "WandaConfig",
    "WandaMethod",
    "WidthConfig",
    "WidthMethod",
]
