"""The ``visual_tokens`` step: turn on visual-token pruning for a VLM and record it in ``pruning_config``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ...errors import RecipeError, UnsupportedModelError
from ...pruning.base import PruneContext, PruningMethod, StepConfig
from ...report import StepReport
from ...vlm.tokens import STRATEGIES, enable_visual_token_pruning


@dataclass
class VisualTokensConfig(StepConfig):
    """Visual-token pruning at inference: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024),
    DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025),
    and random / uniform-stride baselines. Nothing is removed from the weights; the setting is saved in
    ``pruning_config`` and re-enabled when hf_prune loads the model.

    Args:
        strategy: fastv | divprune | random | uniform.
        keep: image tokens kept: a ratio in (0, 1] or a count.
        layer: prune before this decoder block (default 2 for FastV, 0 for the others).
        score: FastV's query: ``last`` prompt token or ``text_mean``.

    Example recipe::

        steps:
          - {method: visual_tokens, strategy: fastv, keep: 0.25, layer: 2}
    """

    method: str = "visual_tokens"
    strategy: str = "fastv"
    keep: float = 0.25
    layer: int | None = None
    score: str = "last"
    seed: int = 0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"visual_tokens.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}.")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or self.keep <= 0:
            raise RecipeError(f"visual_tokens.keep must be a ratio in (0, 1] or a count >= 1, got {self.keep!r}.")
        if isinstance(self.keep, float) and self.keep > 1 and not self.keep.is_integer():
            raise RecipeError(f"visual_tokens.keep={self.keep}: a ratio must be <= 1; a count must be whole.")
        if self.score not in ("last", "text_mean"):
            raise RecipeError(f"visual_tokens.score must be 'last' or 'text_mean', got {self.score!r}.")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise RecipeError(f"visual_tokens.layer must be a non-negative block index, got {self.layer!r}.")

    def settings(self) -> dict:
        return {
            "strategy": self.strategy,
            "keep": self.keep,
            "layer": self.layer,
            "score": self.score,
            "seed": self.seed,
        }


class VisualTokensMethod(PruningMethod):
    """Visual-token pruning for vision-language models (FastV, DivPrune, random, uniform)."""

    needs_calibration = False
    config: VisualTokensConfig

    def preflight(self, ctx: PruneContext) -> None:
        if not ctx.adapter.is_vlm:
            raise UnsupportedModelError(
                f"visual_tokens needs a vision-language model; {ctx.adapter.family} is not one."
            )

    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        pruner = enable_visual_token_pruning(ctx.model, **self.config.settings())
        report = StepReport(self.config.method, self.config.to_dict(), self.config.non_default_dict())
        report.details = {"prune_before_block": pruner.k, "image_token_id": pruner.image_token}
        report.time_s = time.perf_counter() - start
        return report
