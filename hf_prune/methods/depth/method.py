"""Depth pruning: remove whole decoder blocks chosen by similarity or by perplexity, into a plain HF model."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ... import distributed
from ...adapters import ModelAdapter, get_submodule
from ...calibration.engine import hooks, model_device
from ...calibration.stats import CosineStats
from ...errors import PruningCheckError, RecipeError, UnsupportedModelError
from ...pruning.base import PruneContext, PruningMethod, StepConfig
from ...report import StepReport
from ...surgery import remove_blocks, structure_mismatch
from ...utils import logger
from .compensation import RunStatistics, fit_map, squared_error
from .scores import allowed_blocks, angular_distance, best_consecutive_run, lowest_scoring, random_blocks
from .writers import mlp_writer

CRITERIA = ("angular", "block_influence", "ppl_delta", "random")
COMPENSATIONS = ("none", "least_squares", "relative_least_squares")


@dataclass
class DepthConfig(StepConfig):
    """Remove whole decoder blocks.

    Criteria:
        ``angular``: the run of ``num_blocks`` CONSECUTIVE blocks whose input and output hidden states are closest in
            angular distance arccos(cos)/pi (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers").
        ``block_influence``: the blocks with the lowest 1 - cos(input, output) (Men et al., ShortGPT).
        ``ppl_delta``: the blocks whose removal alone raises the calibration perplexity least (Kim et al.,
            "Shortened LLaMA"); ``iterative: true`` re-scores after each removal (costs ~num_blocks times more).
        ``random``: a seeded random choice (the baseline the literature says is hard to beat at some ratios).

    Args:
        num_blocks / ratio / blocks: how many blocks (or which, by index) to remove; give exactly one.
        keep_first / keep_last: never remove the first / last k blocks.
        last_token_only: cosine similarities on the last token of each window instead of every token.
        ppl_nsamples: calibration windows used by ``ppl_delta`` (default: all of them).
        seed: for ``random``.
        compensate: ``least_squares`` replaces each removed run of blocks by a linear map fitted on the calibration
            activations and folded into the down projection of the last kept block before the run (ReplaceMe,
            Shopkhoev et al., 2025): the checkpoint stays the family's plain class; kept per run only where it
            lowers the run's calibration error (both errors in the report). ``relative_least_squares``: the same
            map fitted on each token's error relative to its norm (weighted least squares: tokens with massive
            activations no longer decide the fit). ``none``: the blocks are just removed.

    Example recipe::

        steps:
          - {method: depth, criterion: angular, ratio: 0.2}
          - {method: wanda, structure: "2:4"}         # then weight-prune what is left
    """

    method: str = "depth"
    criterion: str = "angular"
    num_blocks: int | None = None
    ratio: float | None = None
    blocks: list[int] | None = None
    keep_first: int = 0
    keep_last: int = 0
    last_token_only: bool = False
    iterative: bool = False
    ppl_nsamples: int | None = None
    seed: int = 0
    compensate: str = "none"

    def validate(self) -> None:
        given = [k for k in ("num_blocks", "ratio", "blocks") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"depth: give exactly one of num_blocks, ratio or blocks (got {given or 'none'}).")
        if self.criterion not in CRITERIA:
            raise RecipeError(f"depth.criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}.")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            raise RecipeError(f"depth.ratio must be in (0, 1): a fraction of the blocks to remove, got {self.ratio}.")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise RecipeError(f"depth.num_blocks must be a positive integer, got {self.num_blocks!r}.")
        if self.blocks is not None:
            if not self.blocks or not all(isinstance(b, int) and not isinstance(b, bool) for b in self.blocks):
                raise RecipeError(f"depth.blocks must be a non-empty list of block indices, got {self.blocks!r}.")
            if len(set(self.blocks)) != len(self.blocks):
                raise RecipeError(f"depth.blocks lists a block twice: {self.blocks}.")
        for key in ("keep_first", "keep_last"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise RecipeError(f"depth.{key} must be a non-negative integer.")
        if self.compensate not in COMPENSATIONS:
            raise RecipeError(f"depth.compensate must be one of {', '.join(COMPENSATIONS)}, got {self.compensate!r}.")
        if self.iterative and self.criterion != "ppl_delta":
            raise RecipeError("depth.iterative applies to criterion: ppl_delta only.")


class DepthMethod(PruningMethod):
    """Remove whole decoder blocks (ShortGPT / angular distance / Shortened LLaMA / random).

    Recipe: ``steps: [{method: depth, criterion: angular, num_blocks: 6}]``. The model keeps its class: it saves with
    ``save_pretrained`` and reloads with plain ``AutoModelForCausalLM.from_pretrained``.
    """

    config: DepthConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        c = self.config
        return c.compensate != "none" or (c.blocks is None and c.criterion != "random")

    removed: tuple[int, list[int]] | None = None

    def pruning_config(self) -> dict[str, Any]:
        out = self.config.to_dict()
        if self.removed is not None:
            out["blocks_before"], out["removed_blocks"] = self.removed[0], self.removed[1]
        return out

    # ------------------------------------------------------------------ planning
    def count(self, total: int) -> int:
        c = self.config
        if c.blocks is not None:
            return len(c.blocks)
        return c.num_blocks if c.num_blocks is not None else max(1, round(c.ratio * total))

    def preflight(self, ctx: PruneContext) -> None:
        c, total = self.config, ctx.adapter.num_blocks
        n = self.count(total)
        if c.blocks is not None:
            bad = [b for b in c.blocks if not 0 <= b < total]
            if bad:
                raise RecipeError(f"depth.blocks {bad} out of range: the model has blocks 0..{total - 1}.")
        if n >= total:
            raise RecipeError(f"depth: removing {n} of {total} blocks would leave none; remove at most {total - 1}.")
        allowed = allowed_blocks(total, c.keep_first, c.keep_last)
        if c.blocks is None and len(allowed) < n:
            raise RecipeError(
                f"depth: {n} blocks to remove but keep_first={c.keep_first} and keep_last={c.keep_last} leave only "
                f"{len(allowed)} removable blocks."
            )
        if c.compensate != "none":
            why = _why_not_compensable(ctx)
            if why:
                raise RecipeError(
                    f"depth.compensate: {c.compensate} does not support {ctx.adapter.family}: {why}. "
                    "Use compensate: none."
                )
        trial = c.blocks if c.blocks is not None else sorted({allowed[0], allowed[len(allowed) // 2]})[:n]
        problem = structure_mismatch(ctx.model, ctx.adapter, trial)
        if problem:
            raise RecipeError(
                f"depth: {ctx.adapter.family}'s config has a per-layer structure hf_prune cannot renumber, so the "
                f"saved model would not reload ({problem}). Nothing was changed; please report the architecture."
            )

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def similarity_scores(self, ctx: PruneContext, n: int) -> tuple[dict[int, float], dict[int, float]]:
        """One dense pass: block influence 1 - cos(in, out) per block, and angular distance between the input of
        block l and the output of block l + n - 1 for every l."""
        last = self.config.last_token_only
        influence: dict[int, float] = {}
        angular: dict[int, float] = {}
        window: deque[tuple[int, list[torch.Tensor]]] = deque()  # inputs of the last n blocks (kept on CPU)
        engine = ctx.engine()
        for step in engine.walk(desc="depth: similarity"):
            outputs = step.forward()
            bi = CosineStats(last)
            for x, y in zip(step.inputs, outputs):
                bi.update(x, y)
            influence[step.index] = 1.0 - bi.mean
            kept = [x[:, -1:, :].cpu() if last else x.cpu() for x in step.inputs]
            window.append((step.index, kept))
            if len(window) > n:
                window.popleft()
            if len(window) == n:
                start, start_inputs = window[0]
                cos = CosineStats(last)
                for x, y in zip(start_inputs, outputs):
                    cos.update(x, y[:, -1:, :] if last else y)
                angular[start] = angular_distance(cos.mean)
            step.info["outputs"] = outputs
        return influence, angular

    @torch.no_grad()
    def calibration_nll(self, ctx: PruneContext, skip: set[int], windows: torch.Tensor) -> float:
        """Mean token NLL of the calibration windows with blocks ``skip`` bypassed (their output = their input)."""
        blocks = ctx.adapter.blocks
        saved = {i: blocks[i].__dict__.get("forward") for i in skip}
        try:
            for i in skip:
                blocks[i].forward = _identity_block
            device = model_device(ctx.model)
            nll, count = 0.0, 0
            for row in windows:
                ids = row.unsqueeze(0).to(device)
                logits = ctx.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
            nll, count = distributed.all_reduce_numbers(nll, count)
        finally:
            for i, original in saved.items():
                if original is None:
                    blocks[i].__dict__.pop("forward", None)
                else:
                    blocks[i].forward = original
        return nll / count

    def ppl_delta_choice(self, ctx: PruneContext, n: int, allowed: list[int]) -> tuple[list[int], dict[int, float]]:
        windows = ctx.calibration_ids()
        if self.config.ppl_nsamples:
            windows = windows[: self.config.ppl_nsamples]
        windows = windows[distributed.shard(windows.shape[0])]
        removed: list[int] = []
        first_scores: dict[int, float] = {}
        rounds = n if self.config.iterative else 1
        if self.config.iterative:
            logger.info("depth: iterative ppl_delta re-scores after each removal: %d rounds.", n)
        for r in range(rounds):
            candidates = [i for i in allowed if i not in removed]
            scores = {}
            for i in tqdm(candidates, desc=f"depth: ppl without each block ({r + 1}/{rounds})", leave=False):
                scores[i] = math.exp(self.calibration_nll(ctx, set(removed) | {i}, windows))
            if r == 0:
                first_scores = scores
            if self.config.iterative:
                removed.append(min(candidates, key=lambda i: (scores[i], i)))
            else:
                removed = lowest_scoring(scores, n, candidates)
        return sorted(removed), first_scores

    # ------------------------------------------------------------------ compensation
    @torch.no_grad()
    def compensate(self, ctx: PruneContext, chosen: list[int]) -> list[dict[str, Any]]:
        """One dense pass: for every removed run l..e (l > 0), the sums of the least-squares map from block l-1's
        MLP output to what the run added; each map folded into block l-1's down projection (of an MoE block: every
        expert's and shared expert's) where it lowers the run's calibration error. One report entry per run."""
        runs = removed_runs(chosen)
        by_writer = {first - 1: (first, last) for first, last in runs if first > 0}
        by_end = {last: first - 1 for first, last in runs if first > 0}
        entries = [
            {"blocks": [first, last], "compensated": False, "why": "no kept block before it"}
            for first, last in runs
            if first == 0
        ]
        open_runs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # writer -> (M chunks, inputs)
        stats: dict[int, RunStatistics] = {}
        writers = {w: mlp_writer(ctx.adapter, w) for w in by_writer}
        for step in ctx.engine().walk(desc="depth: least-squares maps"):
            i = step.index
            if i in by_writer:
                seen: list[torch.Tensor] = []
                attention_out: list[torch.Tensor] = []
                added = [writers[i].module.register_forward_hook(_recorder(seen))]
                mixer = token_mixer(step.block, ctx.adapter.spec)
                if mixer is not None:  # the check reads the first chunk only
                    added.append(mixer.register_forward_hook(_recorder(attention_out, first_only=True)))
                with hooks(added):
                    outputs = step.forward()
                if attention_out:
                    _check_plain_residual(
                        ctx.adapter.block_name(i), step.inputs[0], attention_out[0], seen[0], outputs[0]
                    )
                open_runs[i] = (seen, outputs)
                relative = self.config.compensate == "relative_least_squares"
                stats[i] = RunStatistics(outputs[0].shape[-1], outputs[0].device, relative)
                step.info["outputs"] = outputs
            elif i in by_end:
                writer = by_end[i]
                outputs = step.forward()
                mlp_out, run_inputs = open_runs.pop(writer)
                for m, x, y in zip(mlp_out, run_inputs, outputs):
                    stats[writer].update(m, x, y)
                step.info["outputs"] = outputs
        for writer, (first, last) in by_writer.items():
            st = stats[writer]
            for t in (st.G, st.C):
                distributed.all_reduce_sum(t)
            st.b_sq, st.l_sq = distributed.all_reduce_numbers(st.b_sq, st.l_sq)
            T = fit_map(st.G, st.C)
            before = squared_error(st.G, st.C, st.b_sq, None) / max(st.l_sq, 1e-30)
            after = squared_error(st.G, st.C, st.b_sq, T) / max(st.l_sq, 1e-30)
            ref = writers[writer]
            entry = {
                "blocks": [first, last],
                "writer": ref.name,
                "error_removed": round(before, 6),
                "error_compensated": round(after, 6),
                "compensated": after < before,
            }
            if entry["compensated"]:
                with ctx.block_context(ctx.adapter.blocks[writer]):
                    ref.fold(T)
            logger.info(
                "depth: blocks %d-%d replaced by a least-squares map in %s: relative error %.4g -> %.4g (%s)",
                first,
                last,
                ref.name,
                before,
                after,
                "folded" if entry["compensated"] else "not folded: not lower",
            )
            entries.append(entry)
        return sorted(entries, key=lambda e: e["blocks"])

    # ------------------------------------------------------------------ run
    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        c = self.config
        total = ctx.adapter.num_blocks
        n = self.count(total)
        allowed = allowed_blocks(total, c.keep_first, c.keep_last)
        report = StepReport(c.method, c.to_dict(), c.non_default_dict())
        details: dict[str, Any] = {"blocks_before": total}
        if c.blocks is not None:
            chosen = sorted(c.blocks)
        elif c.criterion == "random":
            chosen = random_blocks(n, allowed, c.seed)
        elif c.criterion == "ppl_delta":
            chosen, scores = self.ppl_delta_choice(ctx, n, allowed)
            details["scores"] = {"calibration_ppl_without_block": _rounded(scores)}
        else:
            influence, angular = self.similarity_scores(ctx, n)
            details["scores"] = {"block_influence": _rounded(influence), f"angular_distance_n{n}": _rounded(angular)}
            if c.criterion == "angular":
                chosen = best_consecutive_run(angular, n, allowed)
            else:
                chosen = lowest_scoring(influence, n, allowed)
        details["removed_blocks"] = chosen
        if c.compensate != "none":
            details["compensation"] = self.compensate(ctx, chosen)
        self.removed = (total, chosen)
        details["config_changes"] = remove_blocks(ctx.model, ctx.adapter, chosen)
        problem = structure_mismatch(ctx.model, ModelAdapter(ctx.model))
        if problem:
            raise PruningCheckError(f"depth: after removing blocks {chosen} the config no longer matches: {problem}.")
        details["blocks_after"] = total - len(chosen)
        logger.info("depth: removed blocks %s (%s)", chosen, c.criterion if c.blocks is None else "explicit")
        report.details = details
        report.time_s = time.perf_counter() - start
        return report


def _why_not_compensable(ctx: PruneContext) -> str | None:
    """Why the map cannot be folded into the down projection before a run (None: it can): the block's output must be
    its input plus attention plus the down projection's output, unscaled and unnormalized."""
    spec, config = ctx.adapter.spec, ctx.model.config
    if spec is None:
        return "hf_prune has no layout of its blocks"
    if "mlp_out" in spec.norms:
        return "its MLP output is normalized before it joins the residual stream (sandwich norms)"
    adapter = ctx.adapter
    unknown = [i for i in range(adapter.num_blocks) if mlp_writer(adapter, i) is None]
    if unknown:
        return f"hf_prune does not know what writes the MLP output of block {unknown[0]} into the stream"
    scaled = {
        k: v
        for k, v in config.to_dict().items()
        if "residual" in k and ("multiplier" in k or "scale" in k) and isinstance(v, (int, float)) and v != 1
    }
    if scaled:
        return f"its residual branch is scaled ({scaled}), so the MLP output is not what joins the residual stream"
    if getattr(config, "do_layer_norm_before", True) is False:
        return "its blocks normalize after the residual, so the MLP output is not what joins the residual stream"
    return None


RESIDUAL_TOLERANCE = 0.25  # of the branches' norm: bf16 rounding of the stream stays far below, a scaled branch not


def _check_plain_residual(name: str, x: torch.Tensor, attention: torch.Tensor, mlp: torch.Tensor, y: torch.Tensor):
    """The fit and the fold assume the block's output is its input plus its attention and MLP outputs, unscaled;
    checked on the first chunk before anything is folded (a family may scale its branches under a config key hf_prune
    does not know)."""
    branches = attention.float().reshape(y.shape) + mlp.float().reshape(y.shape)  # OPT flattens its MLP tokens
    rest = (y.float() - x.to(y.device).float() - branches).norm()
    ratio = float(rest / branches.norm().clamp_min(1e-30))
    if ratio > RESIDUAL_TOLERANCE:
        raise UnsupportedModelError(
            f"depth.compensate: {name}'s output is not its input plus its attention and MLP outputs (what is left "
            f"is {ratio:.2f} of the branches): its residual branches are scaled or normalized, so the map cannot be "
            "folded into its MLP. Nothing was changed; use compensate: none."
        )


def _recorder(store: list[torch.Tensor], first_only: bool = False):
    """Keeps a copy of a module's output (the block may add to it in place afterwards: Falcon adds the attention
    output into the MLP's), of every call or of the first."""

    def record(module, args, out):
        if not (first_only and store):
            store.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    return record


def token_mixer(block: nn.Module, spec) -> nn.Module | None:
    """The block's attention, or what mixes tokens in its place (LFM2's convolution blocks)."""
    for path in (spec.attention, *spec.other_mixers):
        module = get_submodule(block, path)
        if module is not None:
            return module
    return None


def removed_runs(chosen: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for b in sorted(chosen):
        if runs and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


def _identity_block(hidden_states=None, *args, **kwargs):
    return hidden_states if hidden_states is not None else kwargs["hidden_states"]


def _rounded(scores: dict[int, float]) -> dict[int, float]:
    return {int(k): round(float(v), 6) for k, v in sorted(scores.items())}
