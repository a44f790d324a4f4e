"""Wanda: pruning by weights and activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...adapters import WeightRef
from ...calibration.stats import InputNormStats
from ...pruning.masks import Structure, select_mask
from ...pruning.scores import wanda_score_slabs
from ...pruning.weight_pruning import WeightPruningConfig, WeightPruningMethod


@dataclass
class WandaConfig(WeightPruningConfig):
    """Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

    Scores every weight by |W_ij| * ||X_j||_2 and removes the lowest scores of each output row (or N of every M).

    Example recipe::

        calibration: {source: fortunes, nsamples: 128, seqlen: 2048, seed: 0}
        steps:
          - {method: wanda, sparsity: 0.5}              # or structure: "2:4"
    """

    method: str = "wanda"


class WandaMethod(WeightPruningMethod):
    """Wanda: |W| * ||X|| per input channel, compared per output row as in the paper."""

    comparison_group = "row"
    float_weight = False  # each slab of rows is scored in float32

    def make_stats(self, ref: WeightRef) -> InputNormStats:
        return InputNormStats(ref.in_features, ref.device)

    def prune_weight(
        self, weight: torch.Tensor, stats: InputNormStats, sparsity: float, structure: Structure, name: str
    ):
        """Rows are compared on their own, so the mask is built a slab of rows at a time: the float32 scores and
        the selection's indices of a 14336 x 4096 matrix would otherwise be ~0.5 GiB beside it."""
        mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        for rows, scores in wanda_score_slabs(weight, stats.norms):
            mask[rows] = select_mask(scores, sparsity, structure, "row")
        return None, mask
