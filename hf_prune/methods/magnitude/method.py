"""Magnitude pruning: the baseline every paper reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import RecipeError
from ...pruning.masks import Structure, select_mask
from ...pruning.weight_pruning import WeightPruningConfig, WeightPruningMethod


@dataclass
class MagnitudeConfig(WeightPruningConfig):
    """Magnitude pruning (Han et al., 2015; the baseline of the Wanda and SparseGPT papers).

    Args:
        group: compare |W| over the whole ``layer`` (the papers' baseline, default) or per output ``row``.

    Example recipe step::

        - {method: magnitude, sparsity: 0.5}
    """

    method: str = "magnitude"
    group: str = "layer"

    def validate(self) -> None:
        super().validate()
        if self.group not in ("layer", "row"):
            raise RecipeError(f"magnitude.group must be 'layer' or 'row', got {self.group!r}.")


class MagnitudeMethod(WeightPruningMethod):
    """Remove the weights of smallest |W|; needs no calibration data.

    Paper: Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural Networks" (2015).
    Recipe: ``steps: [{method: magnitude, sparsity: 0.5, structure: "2:4"}]``.
    """

    uses_statistics = False

    def __init__(self, config: MagnitudeConfig):
        super().__init__(config)
        self.comparison_group = config.group

    def prune_weight(self, weight: torch.Tensor, stats, sparsity: float, structure: Structure, name: str):
        return None, select_mask(weight.abs(), sparsity, structure, self.comparison_group)
