"""hf_prune: Hugging Face-native post-training pruning for LLMs and VLMs."""

__version__ = "0.1.0"

from .adapters import ArchSpec, ModelAdapter  # noqa: E402
from .errors import (  # noqa: E402
    CalibrationDataError,
    HFPruneError,
    OutputExistsError,
    PruningCheckError,
    RecipeError,
    UnsupportedModelError,
)
from .eval import PERPLEXITY_CONVENTION, perplexity  # noqa: E402
from .pruner import HFPruner  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .registry import available_methods, get_method, register_method  # noqa: E402
from .report import PruningReport  # noqa: E402
from .streaming import prune_streaming  # noqa: E402

__all__ = [
    "PERPLEXITY_CONVENTION",
    "ArchSpec",
    "CalibrationDataError",
    "HFPruneError",
    "HFPruner",
    "ModelAdapter",
    "OutputExistsError",
    "PruningCheckError",
    "PruningReport",
    "Recipe",
    "RecipeError",
    "UnsupportedModelError",
    "available_methods",
    "get_method",
    "perplexity",
    "prune_streaming",
    "register_method",
]
