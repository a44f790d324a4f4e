"""OWL: outlier-weighted layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
Sauce for Pruning LLMs to High Sparsity", ICML 2024).

Per block, the outlier ratio D is the fraction of Wanda scores |W_ij| * ||X_j|| (over all the block's target
linears together) above ``M`` times their mean, measured in one pass over the DENSE model. Blocks with more outliers
keep more weights: the ratios are min-max scaled to [0, 2*lambda], centred on their mean, and added to the target
density (as in the paper's code), so block sparsities span at most 2*lambda and average exactly to the target.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..adapters import ModelAdapter, WeightRef
from ..calibration.engine import BlockwiseEngine, hooks
from ..calibration.expert_stats import ExpertStatistics
from ..calibration.stats import InputNormStats
from .scores import wanda_score_slabs
from .targets import split_refs


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` (taken together) above ``m`` times their mean. ``scores`` is read twice
    (the mean, then the count), one tensor at a time: a list, or an iterable that makes each tensor as it is reached,
    so a block's scores need never be in memory together."""
    total, count = 0.0, 0
    for s in scores:
        total, count = total + float(s.sum(dtype=torch.float64)), count + s.numel()
    threshold = m * total / max(count, 1)
    return sum(int((s > threshold).sum()) for s in scores) / max(count, 1)


class BlockScores:
    """The Wanda scores of a block's targets, made a slab of rows at a time each time they are iterated."""

    def __init__(self, refs: list[WeightRef], stats: dict[str, InputNormStats]):
        self.refs, self.stats = refs, stats

    def __iter__(self):
        for ref in self.refs:
            for _, scores in wanda_score_slabs(ref.weight(), self.stats[ref.name].norms):
                yield scores


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios: more outliers, less sparsity; spread <= 2*lam; mean = target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if len(ratios) < 2 or float(spread) == 0.0:
        return [target] * len(ratios)
    scaled = (r - r.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1.0 - target)
    return [float(1.0 - d) for d in density]


def _updater(stats: InputNormStats):
    return lambda module, args: stats.update(args[0])


def _norm_stats(ref: WeightRef) -> InputNormStats:
    return InputNormStats(ref.in_features, ref.device)


@torch.no_grad()
def measure_outlier_ratios(
    engine: BlockwiseEngine,
    adapter: ModelAdapter,
    refs_by_block: dict[int, list[WeightRef]],
    m: float,
    moe_calibration: str = "routed",
    moe_min_tokens: int = 0,
) -> dict[int, float]:
    """One dense pass: each block's outlier ratio of Wanda scores over its targets (routed experts scored on the
    tokens routed to them)."""

    ratios: dict[int, float] = {}
    for step in engine.walk(desc="owl: outlier ratios"):
        refs = refs_by_block.get(step.index)
        if not refs:
            continue
        linears, experts = split_refs(refs)
        stats = {r.name: _norm_stats(r) for r in linears}
        with hooks([r.module.register_forward_pre_hook(_updater(stats[r.name])) for r in linears]):
            if experts:
                spec = adapter.moe_spec(step.index)
                collector = ExpertStatistics(step, spec, experts, _norm_stats, moe_calibration, moe_min_tokens)
                step.info["outputs"] = collector.accumulate(keep_outputs=True)
                stats.update(collector.stats)
            else:
                step.info["outputs"] = step.forward()
        for s in stats.values():
            s.all_reduce()
        ratios[step.index] = outlier_ratio(BlockScores(refs, stats), m)
    return ratios
