"""Vision-language models: image+text calibration, and visual-token pruning (FastV, DivPrune) at inference."""

from .tokens import STRATEGIES, VisualTokenPruner, VisualTokenSettings, enable_visual_token_pruning

__all__ = ["STRATEGIES", "VisualTokenPruner", "VisualTokenSettings", "enable_visual_token_pruning"]
