"""hf_prune: Hugging Face-native post-training pruning for LLMs and VLMs."""

from .adapters import ArchSpec, ModelAdapter
from .errors import (
    CalibrationDataError,
    HFPruneError,
    OutputExistsError,
    PruningCheckError,
    RecipeError,
    UnsupportedModelError,
)
from .eval import PERPLEXITY_CONVENTION, perplexity
from .pruner import HFPruner
from .pruning.base import PruningMethod, StepConfig
from .pruning.context import PruneContext
from .recipe import Recipe
from .registry import available_methods, get_method, register_method
from .report import PruningReport
from .streaming import prune_streaming
from .version import __version__

__all__ = [
    "PERPLEXITY_CONVENTION",
    "ArchSpec",
    "CalibrationDataError",
    "HFPruneError",
    "HFPruner",
    "ModelAdapter",
    "OutputExistsError",
    "PruningCheckError",
    "PruneContext",
    "PruningMethod",
    "PruningReport",
    "Recipe",
    "RecipeError",
    "StepConfig",
    "UnsupportedModelError",
    "__version__",
    "available_methods",
    "get_method",
    "perplexity",
    "prune_streaming",
    "register_method",
]
