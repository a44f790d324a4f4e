"""Expert pruning: remove whole routed experts from every MoE block, into a plain checkpoint of the same class."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ... import distributed
from ...adapters import ModelAdapter
from ...adapters.experts import expert_count, is_fused
from ...calibration.engine import hooks
from ...calibration.experts import ExpertCall, expert_call_hooks, expert_output
from ...errors import RecipeError
from ...pruning.base import PruneContext, PruningMethod, StepConfig
from ...report import StepReport
from ...surgery import remove_experts, text_config
from ...utils import logger
from .scores import ExpertScores, lowest, random_scores

CRITERIA = ("reap", "frequency", "random")


@dataclass
class ExpertsConfig(StepConfig):
    """Remove routed experts from every mixture-of-experts block.

    Criteria:
        ``reap``: router-weighted expert activation, the mean over the tokens routed to an expert of the norm of
            what it adds to the output (Lasby et al., "REAP the Experts", Cerebras 2025).
        ``frequency``: how many calibration tokens the router sends to the expert.
        ``random``: a seeded random choice (baseline; needs no calibration).

    Blocks are scored one after another on the inputs that arrive through the already pruned blocks.

    Args:
        num_experts / ratio: how many (or which fraction) of each block's routed experts to remove; give one.
        seed: for ``random``.

    Example recipe::

        steps:
          - {method: experts, criterion: reap, ratio: 0.25}
          - {method: wanda, sparsity: 0.5}        # then weight-prune the experts that are left
    """

    method: str = "experts"
    criterion: str = "reap"
    num_experts: int | None = None
    ratio: float | None = None
    seed: int = 0

    def validate(self) -> None:
        given = [k for k in ("num_experts", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"experts: give exactly one of num_experts or ratio (got {given or 'none'}).")
        if self.criterion not in CRITERIA:
            raise RecipeError(f"experts.criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}.")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            raise RecipeError(
                f"experts.ratio must be in (0, 1): a fraction of the experts to remove, got {self.ratio}."
            )
        if self.num_experts is not None and (
            isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1
        ):
            raise RecipeError(f"experts.num_experts must be a positive integer, got {self.num_experts!r}.")


class ExpertsMethod(PruningMethod):
    """Remove whole routed experts (REAP / routing frequency / random), slicing the fused expert tensors, the router
    and the config: the result reloads with plain ``AutoModelForCausalLM.from_pretrained``.

    Recipe: ``steps: [{method: experts, criterion: reap, ratio: 0.25}]``.
    """

    config: ExpertsConfig
    removed: dict[int, list[int]] | None = None

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.criterion != "random"

    def pruning_config(self) -> dict[str, Any]:
        out = self.config.to_dict()
        if self.removed is not None:
            out["removed_experts"] = {str(k): v for k, v in self.removed.items()}
        return out

    # ------------------------------------------------------------------ planning
    def _plan(self, adapter: ModelAdapter) -> tuple[int, int, int]:
        """(experts per block, how many to remove, router groups) after checking the request fits the model."""
        blocks = adapter.moe_blocks()
        if not blocks:
            raise RecipeError(
                f"experts: {adapter.family} has no mixture-of-experts block the adapter knows; nothing to remove. "
                "Expert pruning needs a family with routed experts (qwen3_moe, mixtral, gpt_oss, olmoe, qwen2_moe, "
                "deepseek_v3, llama4_text)."
            )
        spec = adapter.moe_spec(blocks[0])
        counts = {expert_count(adapter.experts_module(i), adapter.moe_spec(i).layout) for i in blocks}
        if len(counts) != 1:
            raise RecipeError(f"experts: MoE blocks hold different expert counts {sorted(counts)}; not supported.")
        total = counts.pop()
        c = self.config
        k = c.num_experts if c.num_experts is not None else max(1, round(c.ratio * total))
        if k >= total:
            raise RecipeError(
                f"experts: removing {k} of {total} experts would leave none; remove at most {total - 1}."
            )
        config = text_config(adapter.model)
        groups = getattr(config, spec.expert_groups_key, 1) if spec.expert_groups_key else 1
        groups = groups if isinstance(groups, int) and groups > 0 else 1
        if groups > 1 and (k % groups or (total - k) // groups < 2):
            raise RecipeError(
                f"experts: this model routes over {groups} equal groups of experts ({spec.expert_groups_key}); "
                f"remove a multiple of {groups} that leaves at least 2 experts per group (asked {k} of {total})."
            )
        if not is_fused(adapter.experts_module(blocks[0])):
            raise RecipeError(
                "experts: this model keeps its experts as a ModuleList of MLPs (remote code or an older layout); "
                "expert removal slices transformers 5's fused expert tensors. Load it with the transformers 5 class."
            )
        if adapter.router_module(blocks[0]) is None:
            raise RecipeError(f"experts: cannot find the router of {adapter.family}'s MoE blocks to slice its rows.")
        return total, k, groups

    @staticmethod
    def _top_k_change(adapter: ModelAdapter, remaining: int, groups: int) -> tuple[int, int] | None:
        """(old, new) experts per token when fewer experts remain than the router picks (or can reach through
        DeepSeek's group-limited routing), else None."""
        spec = adapter.moe_spec(adapter.moe_blocks()[0])
        config = text_config(adapter.model)
        top_k = getattr(config, spec.top_k_key, None)
        reachable = remaining // groups * getattr(config, "topk_group", groups) if groups > 1 else remaining
        return (top_k, reachable) if isinstance(top_k, int) and top_k > reachable else None

    def preflight(self, ctx: PruneContext) -> None:
        self._plan(ctx.adapter)

    # ------------------------------------------------------------------ run
    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        c, adapter = self.config, ctx.adapter
        total, k, groups = self._plan(adapter)
        top_k = self._top_k_change(adapter, total - k, groups)
        report = StepReport(c.method, c.to_dict(), c.non_default_dict())
        removed: dict[int, list[int]] = {}
        scores_out: dict[int, list[float]] = {}
        tokens_out: dict[int, list[int]] = {}
        moe_blocks = set(adapter.moe_blocks())
        if c.criterion == "random":
            for i in sorted(moe_blocks):
                removed[i] = lowest(random_scores(total, c.seed, i), k, groups)
                with ctx.block_context(adapter.blocks[i]):
                    remove_experts(adapter, i, removed[i], top_k)
        else:
            for step in ctx.engine().walk(desc=f"experts: {c.criterion}"):
                if step.index not in moe_blocks:
                    continue
                scores = self._score_block(adapter, step)
                values = scores.reap() if c.criterion == "reap" else scores.frequency()
                removed[step.index] = lowest(values, k, groups)
                scores_out[step.index] = [round(float(v), 6) for v in values]
                tokens_out[step.index] = [int(t) for t in scores.tokens]
                remove_experts(adapter, step.index, removed[step.index], top_k)  # the engine re-runs the pruned block
        spec = adapter.moe_spec(min(moe_blocks))
        config = text_config(ctx.model)
        setattr(config, spec.num_experts_key, total - k)
        changes = {spec.num_experts_key: [total, total - k]}
        if top_k is not None:
            setattr(config, spec.top_k_key, top_k[1])
            changes[spec.top_k_key] = list(top_k)
            logger.warning(
                "experts: %d experts remain; each token now goes to %d (was %d).", total - k, top_k[1], top_k[0]
            )
        self.removed = removed
        report.details = {
            "experts_before": total,
            "experts_after": total - k,
            "config_changes": changes,
            "removed_experts": removed,
        }
        if scores_out:
            report.details["scores"] = {c.criterion: scores_out}
            report.details["tokens_per_expert"] = tokens_out
        logger.info("experts: removed %d of %d routed experts in %d blocks (%s)", k, total, len(removed), c.criterion)
        report.time_s = time.perf_counter() - start
        return report

    @torch.no_grad()
    def _score_block(self, adapter: ModelAdapter, step) -> ExpertScores:
        """One forward of the block: each expert's routed tokens and what it adds to the output."""
        spec = adapter.moe_spec(step.index)
        experts = step.block.get_submodule(spec.experts)
        scores = ExpertScores(expert_count(experts, spec.layout))

        def on_call(call: ExpertCall) -> None:
            for e in range(call.num_experts):
                x, weight = call.routed(e)
                y = expert_output(experts, spec.layout, e, x).float()
                scores.update(e, y * weight.float()[:, None] if weight is not None else y)

        with hooks(expert_call_hooks(step.block, spec, on_call)):
            step.forward(keep_outputs=False)
        distributed.all_reduce_sum(scores.tokens)  # a data-parallel run: every rank's tokens
        distributed.all_reduce_sum(scores.contribution)
        return scores
