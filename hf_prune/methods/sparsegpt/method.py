"""SparseGPT over the block-by-block engine."""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from ...adapters import WeightRef
from ...calibration.stats import HessianStats
from ...errors import PruningCheckError, RecipeError
from ...pruning.context import PruneContext
from ...pruning.masks import Structure
from ...pruning.weight_pruning import WeightPruningConfig, WeightPruningMethod
from ...report import StepReport
from ...utils import OffloadedCopy, available_memory_bytes, human_bytes, logger
from .solver import DampeningError, SolveInfo, inverse_cholesky_upper_, sparsegpt_prune_factored


@dataclass
class SparseGPTConfig(WeightPruningConfig):
    """SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    ICML 2023): masks by OBS saliency and reconstruction of the remaining weights from the layer Hessian.

    Args:
        blocksize: columns per lazy-update block (128 in the paper).
        percdamp: dampening added to the Hessian diagonal, as a fraction of its mean (0.01 in the paper);
            raised tenfold, with a log line and a report entry, while the Hessian is not positive definite.

    Example recipe::

        calibration: {source: fortunes, nsamples: 128, seqlen: 2048, seed: 0}
        steps:
          - {method: sparsegpt, sparsity: 0.5}            # or structure: "2:4"; or sparsity_profile: owl
    """

    method: str = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise RecipeError(f"sparsegpt.blocksize must be a positive integer, got {self.blocksize!r}.")
        if not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1e3:
            raise RecipeError(
                f"sparsegpt.percdamp must be a positive number (0.01 = 1% of mean(diag H)), got {self.percdamp!r}."
            )


class SparseGPTMethod(WeightPruningMethod):
    """SparseGPT: prune by OBS saliency and update the kept weights to reconstruct the layer's outputs."""

    comparison_group = "layer"  # the exact pruned count per layer is floor(numel * sparsity)
    float_weight = False  # the solver makes its one float32 working copy
    config: SparseGPTConfig

    def __init__(self, config: SparseGPTConfig):
        super().__init__(config)
        self.dampening: dict[str, float] = {}
        self.dead_inputs: dict[str, int] = {}
        # statistics -> (U, info): linears that read one input (q/k/v, gate/up) share one factor, made
        # once in the Hessian's own memory; an entry goes when its statistics do
        self._factors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def solve_cost(self, ref: WeightRef) -> float:
        n = ref.in_features
        return float(n) ** 3 + float(n) ** 2 * ref.weight().shape[0]  # Cholesky + the column sweep

    def shared_solve_cost(self, refs: list[WeightRef]) -> float:
        n = float(refs[0].in_features)  # one factor for all of them, one sweep each
        return n**3 + sum(n**2 * r.weight().shape[0] for r in refs)

    def stats_bytes(self, ref: WeightRef) -> int:
        return 4 * ref.in_features**2

    def make_stats(self, ref: WeightRef) -> HessianStats:
        return HessianStats(ref.in_features, ref.device)

    def prune_weight(
        self, weight: torch.Tensor, stats: HessianStats, sparsity: float, structure: Structure, name: str
    ):
        try:
            U, info = self._inverse_factor(stats)
        except DampeningError as exc:
            raise PruningCheckError(
                f"{name}: SparseGPT could not invert the Hessian of its inputs ({exc}). Use more calibration text "
                "(nsamples x seqlen well above the layer's input width), raise percdamp, or use wanda."
            ) from exc
        new_weight, mask = sparsegpt_prune_factored(weight, U, info.dead, sparsity, structure, self.config.blocksize)
        if info.raised:
            logger.warning(
                "%s: Hessian not positive definite at percdamp=%g; used %g x mean(diag H).",
                name,
                self.config.percdamp,
                info.damp_fraction,
            )
            self.dampening[name] = info.damp_fraction
        if info.dead_inputs:
            self.dead_inputs[name] = info.dead_inputs
        return new_weight, mask

    def _inverse_factor(self, stats: HessianStats) -> tuple[torch.Tensor, SolveInfo]:
        """The upper Cholesky factor of the damped inverse Hessian, computed in place of the statistics' H (a copy
        kept outside the working memory refills it if a dampening level fails: ``OffloadedCopy``)."""
        cached = self._factors.get(stats)
        if cached is None:
            H = stats.consume()
            backup = _backup(H)
            try:
                restore = backup.restore_into if backup is not None else None
                info = inverse_cholesky_upper_(H, self.config.percdamp, restore)
            finally:
                if backup is not None:
                    backup.close()
            cached = self._factors[stats] = (H, info)
        return cached

    def run(self, ctx: PruneContext) -> StepReport:
        report = super().run(ctx)
        if self.dampening:
            report.details["dampening_raised"] = dict(self.dampening)
        if self.dead_inputs:
            report.details["dead_inputs"] = dict(self.dead_inputs)
        return report


def _backup(H: torch.Tensor) -> OffloadedCopy | None:
    """A copy of H to refill it from if a dampening level fails (rare): on an accelerator a clone where it has room
    (four times H free), else in host memory; on the CPU a temporary file for a big H. None, with a warning, if it
    cannot be written (the solve then has one try)."""
    size = H.numel() * H.element_size()
    try:
        if H.device.type != "cpu":
            roomy = available_memory_bytes(H.device) > 4 * size
            return OffloadedCopy(H, file_bytes=sys.maxsize, small_on="device" if roomy else "host")
        return OffloadedCopy(H)
    except (OSError, RuntimeError) as exc:  # no room on the disk, or in host memory
        logger.warning(
            "SparseGPT: no copy of a %s Hessian for dampening retries (%s); one try.", human_bytes(size), exc
        )
        return None
