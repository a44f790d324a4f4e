"""Built-in pruning methods; importing this package registers them."""

from ..registry import register_method
from .depth import DepthConfig, DepthMethod
from .experts import ExpertsConfig, ExpertsMethod
from .magnitude import MagnitudeConfig, MagnitudeMethod
from .shrink import ShrinkConfig, ShrinkMethod
from .slicegpt import SliceGPTConfig, SliceGPTMethod
from .sparsegpt import SparseGPTConfig, SparseGPTMethod
from .visual_tokens import VisualTokensConfig, VisualTokensMethod
from .wanda import WandaConfig, WandaMethod
from .width import WidthConfig, WidthMethod

register_method("magnitude", MagnitudeConfig, MagnitudeMethod)
register_method("wanda", WandaConfig, WandaMethod)
register_method("sparsegpt", SparseGPTConfig, SparseGPTMethod)
register_method("depth", DepthConfig, DepthMethod)
register_method("experts", ExpertsConfig, ExpertsMethod)
register_method("slicegpt", SliceGPTConfig, SliceGPTMethod)
register_method("visual_tokens", VisualTokensConfig, VisualTokensMethod)
register_method("width", WidthConfig, WidthMethod)
register_method("shrink", ShrinkConfig, ShrinkMethod)

__all__ = [
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
