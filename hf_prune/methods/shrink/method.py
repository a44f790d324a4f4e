"""Reach a size or a measured speed: combine depth (whole blocks) and width (MLP neurons, and for a size target also
attention heads and hidden channels) pruning, choosing the mix by the calibration perplexity of candidates and, for a
speed target, by latency measured on this machine."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...adapters import ModelAdapter
from ...calibration.data import calibration_batch
from ...calibration.engine import model_device
from ...errors import RecipeError
from ...eval.perplexity import perplexity_of_tokens
from ...pruning.base import PruningMethod, StepConfig
from ...pruning.context import PruneContext
from ...report import StepReport
from ...utils import logger
from ..depth.method import COMPENSATIONS as DEPTH_COMPENSATIONS
from ..depth.method import DepthConfig, DepthMethod
from ..width.method import WidthConfig, WidthMethod
from ..width.scores import COMPENSATIONS, CRITERIA

MAX_MLP = 0.9  # a candidate that would remove more of every remaining MLP than this is not tried


@dataclass
class ShrinkConfig(StepConfig):
    """Shrink the model to a parameter budget or a measured speedup with the best mix of depth and width.

    Args:
        params: fraction of the model's parameters to keep, in (0, 1).
        speedup: prefill speedup to reach, > 1, measured on this machine (``latency_tokens`` tokens, batch 1).
        depth_shares: candidate mixes: the share of the removed block parameters taken by removing whole blocks
            (the rest by removing MLP neurons of the remaining blocks). 0 = width only, 1 = depth only.
        heads, hidden: for a size target, fractions of the attention heads / hidden channels each candidate also
            removes (every combination with every depth share is tried; MLP neurons take the rest). ``[0.0]``:
            MLP neurons only.
        criterion, compensate: the width step's (see ``width``).
        depth_criterion: the depth step's block score (see ``depth``).
        depth_compensate: the depth step's compensation (``none`` / ``least_squares``: each removed run replaced
            by a fitted linear map folded into the block before it; see ``depth``).
        eval_nsamples: held-out calibration windows (the calibration source, next seed) on which candidates are
            compared by perplexity.
        latency_tokens, latency_runs: the prefill that speed targets are measured on (median of runs).

    Example recipe::

        steps:
          - {method: shrink, params: 0.7}     # or speedup: 1.5
    """

    method: str = "shrink"
    params: float | None = None
    speedup: float | None = None
    depth_shares: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    heads: list[float] = field(default_factory=lambda: [0.0])
    hidden: list[float] = field(default_factory=lambda: [0.0])
    criterion: str = "fluctuation"
    compensate: str = "least_squares"
    depth_criterion: str = "angular"
    depth_compensate: str = "none"
    eval_nsamples: int = 8
    latency_tokens: int = 512
    latency_runs: int = 3

    def validate(self) -> None:
        if (self.params is None) == (self.speedup is None):
            raise RecipeError("shrink: give exactly one of params (fraction to keep) or speedup (e.g. 1.5).")
        if self.params is not None and not (isinstance(self.params, (int, float)) and 0 < self.params < 1):
            raise RecipeError(f"shrink.params is the fraction of parameters to keep, in (0, 1); got {self.params!r}.")
        if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and self.speedup > 1):
            raise RecipeError(f"shrink.speedup must be a number > 1, got {self.speedup!r}.")
        shares = self.depth_shares
        if not shares or not all(isinstance(s, (int, float)) and 0 <= s <= 1 for s in shares):
            raise RecipeError(f"shrink.depth_shares must be a non-empty list of numbers in [0, 1], got {shares!r}.")
        for key in ("heads", "hidden"):
            values = getattr(self, key)
            if not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values
            ):
                raise RecipeError(f"shrink.{key} must be a non-empty list of fractions in [0, 1), got {values!r}.")
            if self.speedup is not None and any(values):
                raise RecipeError(
                    f"shrink.{key}: speed targets mix depth and MLP neurons only; use params with {key} candidates."
                )
        if self.criterion not in CRITERIA or self.compensate not in COMPENSATIONS:
            raise RecipeError(
                f"shrink.criterion must be one of {', '.join(CRITERIA)}, compensate one of {', '.join(COMPENSATIONS)}."
            )
        if self.depth_compensate not in DEPTH_COMPENSATIONS:
            raise RecipeError(
                f"shrink.depth_compensate must be one of {', '.join(DEPTH_COMPENSATIONS)}, "
                f"got {self.depth_compensate!r}."
            )
        for key in ("eval_nsamples", "latency_tokens", "latency_runs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"shrink.{key} must be a positive integer, got {value!r}.")


@dataclass(frozen=True)
class Mix:
    """One candidate: blocks removed, and fractions of MLP neurons, heads and hidden channels removed."""

    blocks: int
    mlp: float
    heads: float = 0.0
    hidden: float = 0.0


@dataclass
class BlockBudget:
    """Parameter counts of a uniform decoder: per block (MLP, attention projections, the rest), blocks, whole model."""

    mlp: int
    other: int
    blocks: int
    total: int
    attention: int = 0

    @property
    def block(self) -> int:
        return self.mlp + self.other

    def mix(self, removed: float, share: float, heads: float = 0.0, hidden: float = 0.0) -> Mix | None:
        """The candidate that takes ``removed`` parameters with ``share`` of them by depth, ``heads`` of the attention
        heads and ``hidden`` of the hidden channels, MLP neurons the rest; None where it cannot (too many blocks, the
        other axes already past the target, or MLPs nearly gone)."""
        blocks = round(share * removed / self.block)
        if blocks >= self.blocks:
            return None
        left = self.blocks - blocks
        outside = self.total - self.blocks * self.block  # embeddings, head, final norm
        by_heads = heads * self.attention * left
        by_hidden = hidden * (outside + left * (self.attention * (1 - heads) + self.mlp))
        rest = removed - blocks * self.block - by_heads - by_hidden
        if rest < 0 and (heads or hidden):
            return None
        mlp = max(rest, 0) / (left * self.mlp * (1 - hidden))
        return Mix(blocks, mlp, heads, hidden) if mlp < MAX_MLP else None


def _better(entry: dict, best: dict, speedup: float | None) -> bool:
    """Lower held-out perplexity wins; for a speed target, among candidates that measured it (or the faster one
    while none has)."""
    if speedup is not None:
        reached, best_reached = entry["speedup"] >= speedup, best["speedup"] >= speedup
        if reached != best_reached:
            return reached
        if not reached:
            return entry["speedup"] > best["speedup"]
    return entry["calibration_ppl"] < best["calibration_ppl"]


def measure_budget(model: nn.Module, adapter: ModelAdapter) -> BlockBudget:
    block = adapter.blocks[0]
    roles = {r.role: r.weight().numel() for r in adapter.linears(0)}
    mlp = sum(roles.get(r, 0) for r in ("gate", "up", "gate_up", "down"))
    attention = sum(roles.get(r, 0) for r in ("q", "k", "v", "qkv", "o"))
    other = sum(p.numel() for p in block.parameters()) - mlp
    return BlockBudget(mlp, other, adapter.num_blocks, _count(model), attention)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def prefill_latency(model: nn.Module, tokens: int, runs: int) -> float:
    """Median seconds of one forward over ``tokens`` tokens (batch 1, no cache) after a warm-up."""
    device = model_device(model)
    ids = torch.randint(0, 100, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids[:, :16], use_cache=False)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ShrinkMethod(PruningMethod):
    """Try each depth/width mix that reaches the target, keep the one with the lowest held-out perplexity."""

    config: ShrinkConfig
    supports_offload = False  # edits every block at once / copies the model

    def preflight(self, ctx: PruneContext) -> None:
        c = self.config
        self.budget = measure_budget(ctx.model, ctx.adapter)
        WidthMethod(WidthConfig(mlp=0.5, criterion=c.criterion, compensate=c.compensate)).preflight(ctx)
        for heads in (h for h in c.heads if h):  # the family can lose heads / hidden channels: checked up front
            WidthMethod(WidthConfig(heads=heads, criterion=c.criterion, compensate=c.compensate)).preflight(ctx)
        for hidden in (h for h in c.hidden if h):
            WidthMethod(WidthConfig(hidden=hidden, criterion=c.criterion, compensate=c.compensate)).preflight(ctx)
        DepthMethod(self._depth_config(1)).preflight(ctx)
        if c.params is not None:
            removed = (1 - c.params) * self.budget.total
            if not any(self.budget.mix(removed, *axes) for axes in self._grid()):
                raise RecipeError(
                    f"shrink.params={c.params}: no mix of depth and width reaches it (at most {MAX_MLP:.0%} of each "
                    "MLP and all blocks but one); ask for a larger fraction."
                )

    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        c = self.config
        report = StepReport(c.method, c.to_dict(), c.non_default_dict())
        held_out = self._held_out(ctx)
        dense_latency = prefill_latency(ctx.model, c.latency_tokens, c.latency_runs) if c.speedup else None
        candidates = []
        best = None
        tried = set()
        for share, heads, hidden in self._grid():
            mix = self._mix_for_target(ctx.model, share, heads, hidden, dense_latency)
            asked = {"depth_share": share, "heads_removed": heads, "hidden_removed": hidden}
            if mix is None or mix in tried:
                candidates.append({**asked, "feasible": mix is not None, "same_as_earlier": mix in tried})
                continue
            tried.add(mix)
            model = self._prune_candidate(ctx, mix)
            entry = {
                **asked,
                "blocks_removed": mix.blocks,
                "mlp_removed": round(mix.mlp, 4),
                "params": _count(model),
                "params_kept": round(_count(model) / self.budget.total, 4),
                "calibration_ppl": round(perplexity_of_tokens(model, held_out.reshape(-1), held_out.shape[1]), 4),
            }
            if dense_latency is not None:
                entry["speedup"] = round(dense_latency / prefill_latency(model, c.latency_tokens, c.latency_runs), 3)
            del model  # one candidate in memory at a time; the winner is pruned again in place below
            candidates.append(entry)
            logger.info("shrink candidate: %s", entry)
            if best is None or _better(entry, best, c.speedup):
                best = entry
        if best is None:
            raise RecipeError("shrink: no candidate mix reached the target; ask for less.")
        entry = best
        if c.speedup and entry["speedup"] < c.speedup:
            logger.warning(
                "shrink: no candidate measured a %.2fx speedup here; the fastest measured %.2fx.",
                c.speedup,
                entry["speedup"],
            )
        chosen = Mix(entry["blocks_removed"], entry["mlp_removed"], entry["heads_removed"], entry["hidden_removed"])
        model = self._prune_candidate(ctx, chosen, in_place=True)
        ctx.model, ctx.adapter = model, ModelAdapter(model)
        report.details = {"candidates": candidates, "chosen": entry, "dense_params": self.budget.total}
        if dense_latency is not None:
            report.details["dense_prefill_s"] = round(dense_latency, 4)
        report.time_s = time.perf_counter() - start
        return report

    def _held_out(self, ctx: PruneContext) -> torch.Tensor:
        cal = ctx.calibration
        seqlen = ctx.seqlen()
        windows, _ = calibration_batch(
            cal.source, ctx.tokenizer, self.config.eval_nsamples, seqlen, cal.seed + 1, **cal.source_kwargs()
        )
        return windows

    def _grid(self) -> list[tuple[float, float, float]]:
        c = self.config
        return [(s, h, x) for s in c.depth_shares for h in c.heads for x in c.hidden]

    def _mix_for_target(
        self, model: nn.Module, share: float, heads: float, hidden: float, dense_latency: float | None
    ) -> Mix | None:
        geo, c = self.budget, self.config
        if c.params is not None:
            return geo.mix((1 - c.params) * geo.total, share, heads, hidden)
        # a speed target: start from the block parameters a linear cost model removes, then correct once by the
        # latency of a model of that shape (random weights: speed does not depend on which channels are kept)
        removed = (1 - 1 / c.speedup) * geo.blocks * geo.block
        mix = geo.mix(removed, share)
        for _ in range(2):
            if mix is None:
                return None
            shaped = self._shape_only(model, mix.blocks, mix.mlp)
            measured = dense_latency / prefill_latency(shaped, c.latency_tokens, c.latency_runs)
            if measured >= c.speedup:
                return mix
            removed *= (1 - 1 / c.speedup) / max(1 - 1 / measured, 1e-3)
            mix = geo.mix(removed, share)
        return mix

    @staticmethod
    def _shape_only(model: nn.Module, blocks: int, mlp: float) -> nn.Module:
        """A model of the candidate's shape with random weights, for timing only."""
        from ..width.layout import width_spec

        config = copy.deepcopy(model.config)
        key = width_spec(model, ModelAdapter(model)).mlp_key
        config.num_hidden_layers = config.num_hidden_layers - blocks
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        inter = getattr(config, key)
        setattr(config, key, max(8, int(inter * (1 - mlp)) // 8 * 8))
        param = next(model.parameters())
        with torch.device(param.device):  # built where it is timed, in the model's dtype (no float32 copy)
            return type(model)._from_config(config, dtype=param.dtype).eval()

    def _prune_candidate(self, ctx: PruneContext, mix: Mix, in_place: bool = False) -> nn.Module:
        """The model with ``mix`` removed: a copy (a candidate), or the model itself (the winner, pruned again the
        same way: the same calibration gives the same result)."""
        c = self.config
        model = ctx.model if in_place else copy.deepcopy(ctx.model)
        sub = dataclasses.replace(ctx, model=model, adapter=ModelAdapter(model))
        steps: list[PruningMethod] = []
        if mix.blocks:
            steps.append(DepthMethod(self._depth_config(mix.blocks)))
        if mix.mlp > 0 or mix.heads or mix.hidden:
            width = WidthConfig(
                mlp=mix.mlp, heads=mix.heads, hidden=mix.hidden, criterion=c.criterion, compensate=c.compensate
            )
            steps.append(WidthMethod(width))
        for step in steps:
            step.config.validate()
            step.preflight(sub)
            step.run(sub)
            sub.adapter = ModelAdapter(sub.model)
        return sub.model

    def _depth_config(self, blocks: int) -> DepthConfig:
        c = self.config
        config = DepthConfig(criterion=c.depth_criterion, num_blocks=blocks, compensate=c.depth_compensate)
        config.validate()
        return config

    def pruning_config(self) -> dict[str, Any]:
        return self.config.to_dict()
