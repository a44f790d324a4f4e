"""Structured width pruning: remove MLP neurons and attention heads (whole KV groups under GQA), compensate what they
contributed, and save a smaller dense model that loads where HF models load."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ...adapters import LinearRef, ModelAdapter, WidthSpec, get_submodule, weight_out_in
from ...calibration.engine import BlockStep, hooks
from ...errors import RecipeError, UnsupportedModelError
from ...pruning.base import PruningMethod, StepConfig
from ...pruning.context import PruneContext
from ...report import StepReport
from ...surgery import keep_inputs, keep_outputs, rebuild_plain, updated_config
from ...utils import logger
from . import experts as X
from . import scores as S
from .hidden import READERS, StreamCut, StreamRecorder, stream_sites
from .layout import narrowed_skeleton, plan_mismatch, width_spec

# (producers: their output channels are the pruned ones, consumer: reads them) per part of the block
PARTS = {
    "mlp": (("gate", "up", "gate_up"), "down"),  # gate_up: Phi-3's fused [gate; up]
    "shared": (("shared_gate", "shared_up"), "shared_down"),  # a mixture of experts' shared expert: an MLP
    "heads": (("q", "k", "v", "qkv"), "o"),  # qkv: fused [q; k; v] rows
}


@dataclass
class WidthConfig(StepConfig):
    """Structured width pruning: fewer MLP neurons, attention heads and hidden channels, a smaller dense model.

    Args:
        mlp: fraction of each block's MLP intermediate neurons to remove, in [0, 1). In a mixture of experts: of
            every routed expert's neurons (each keeps its own best, scored on the tokens routed to it; the same
            width for all, as the config has one), of the shared experts' and of the dense blocks' MLPs.
        heads: fraction of attention heads to remove, in [0, 1): whole KV groups (a KV head and the query heads
            that share it) so the query/KV ratio stays valid; with a single KV head, query heads evenly from it.
        hidden: fraction of the hidden (residual-stream) channels to remove everywhere they live (Minitron's
            embedding channels): embeddings, head (tied embeddings stay tied), every norm, every projection that
            reads or writes the stream; ranked by the criterion over the norms' outputs, each norm rescaled for the
            channels it loses; in a mixture of experts also every routed expert's fused matrices, the routers and
            the shared experts; in a vision-language model the projector's output (and LLaVA's projector neurons,
            whose count the config ties to the hidden size: scored on the calibration images, else by weight).
            Saved as the family's own class with a smaller ``hidden_size`` (explicit head_dim).
        criterion: ``fluctuation`` (FLAP: variance of the channel times the squared norm of the column that reads
            it), ``activation`` (Minitron: mean |activation| of the neuron / head output) or ``magnitude`` (norm of
            that column; no data).
        compensate: ``least_squares`` (refit the consuming projection, down / o, on the kept channels from the
            calibration activations), ``bias`` (FLAP: the removed channels' mean contribution into the consumer's
            bias; turns on the family's bias flag) or ``none``.
            Defaults from measurement (SmolLM2-135M, 20% of the parameters in MLP neurons, README): fluctuation +
            least squares 50.08, activation + least squares 52.51, fluctuation + bias 62.99, none 63.75.
        per_block: each block gets its own widths (FLAP's adaptive structure: channel scores standardized per block
            and ranked over the model); saved with hf_prune's modeling file (``trust_remote_code=True``).
        round_to: MLP widths are rounded to a multiple of this (8: friendly to GPU kernels).

    Example recipe::

        steps:
          - {method: width, mlp: 0.3, heads: 0.25}    # criterion: fluctuation, compensate: least_squares
          - {method: width, hidden: 0.25, mlp: 0.2, criterion: activation}    # Minitron's axes
    """

    method: str = "width"
    mlp: float = 0.0
    heads: float = 0.0
    hidden: float = 0.0
    criterion: str = "fluctuation"
    compensate: str = "least_squares"
    per_block: bool = False
    round_to: int = 8

    def validate(self) -> None:
        for key in ("mlp", "heads", "hidden"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise RecipeError(f"width.{key} must be a fraction in [0, 1) of what to remove, got {value!r}.")
        if not self.mlp and not self.heads and not self.hidden:
            raise RecipeError(
                "width: nothing to remove; set mlp, heads and/or hidden, e.g. {method: width, mlp: 0.25}."
            )
        if self.criterion not in S.CRITERIA:
            raise RecipeError(f"width.criterion must be one of {', '.join(S.CRITERIA)}, got {self.criterion!r}.")
        if self.compensate not in S.COMPENSATIONS:
            raise RecipeError(
                f"width.compensate must be one of {', '.join(S.COMPENSATIONS)}, got {self.compensate!r}."
            )
        if not isinstance(self.per_block, bool):
            raise RecipeError(f"width.per_block must be true or false, got {self.per_block!r}.")
        if self.hidden and self.compensate == "bias":
            raise RecipeError(
                "width.compensate: bias compensates mlp and heads only; with hidden use least_squares (the default: "
                "the readers of the stream are refit) or none."
            )
        if self.per_block and self.hidden:
            raise RecipeError(
                "width.hidden narrows the stream of every block alike; it cannot be combined with per_block: true "
                "(run two width steps: one with hidden, one per_block)."
            )
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise RecipeError(f"width.round_to must be a positive integer, got {self.round_to!r}.")


@dataclass
class Geometry:
    """The attention and MLP widths of a (uniform) model."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def group(self) -> int:  # query heads per KV head
        return self.heads // self.kv_heads

    @property
    def query_units(self) -> bool:
        """One KV head shared by several query heads: heads removal takes query heads, not KV groups."""
        return self.kv_heads == 1 and self.heads > 1


def geometry(model: nn.Module, adapter: ModelAdapter, spec: WidthSpec) -> Geometry:
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    down = next((r for r in adapter.linears(0) if r.role == "down"), None)  # none in a first MoE block
    return Geometry(heads, kv, head_dim, down.in_features if down else 0, config.hidden_size)


@dataclass
class Plan:
    """What one block keeps: MLP neurons, and attention units (KV groups, or query heads per group); and the
    stream's channels (the same in every block)."""

    mlp_keep: int
    unit_keep: int
    hidden_keep: int


class WidthMethod(PruningMethod):
    """Remove MLP neurons and attention heads by activation / fluctuation / magnitude, with least-squares or bias
    compensation, into a smaller model of the same class (uniform) or with per-block widths."""

    config: WidthConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        c = self.config
        moe_mlp = getattr(self, "moe", False) and bool(c.mlp)  # experts are cut inside a block forward
        return c.criterion != "magnitude" or c.compensate != "none" or c.per_block or bool(c.hidden) or moe_mlp

    # ------------------------------------------------------------------ planning and checks
    def preflight(self, ctx: PruneContext) -> None:
        adapter, c = ctx.adapter, self.config
        family = adapter.family
        if adapter.is_vlm and c.per_block:
            raise UnsupportedModelError(
                "width.per_block: not supported on vision-language models yet (per-block files are text-only); use a "
                "uniform width."
            )
        self.adapter, self.moe = adapter, bool(adapter.moe_blocks())
        if self.moe:
            self._check_moe(family)
        spec = width_spec(ctx.model, adapter)
        if c.hidden and not spec.heads:
            raise UnsupportedModelError(
                f"width.hidden: {family}'s attention derives head_dim from hidden_size, so a narrower stream cannot "
                "keep its heads; use mlp, or slicegpt."
            )
        if c.heads and not spec.heads:
            raise UnsupportedModelError(
                f"width.heads: {family}'s attention cannot lose heads in a plain checkpoint (it derives head_dim from "
                "hidden_size, or has no separate q/k/v projections); use mlp only."
            )
        geo = geometry(ctx.model, adapter, spec)
        self.model_config = ctx.model.config
        self.spec, self.geo = spec, geo
        self.units, self.unit_size = self._attention_units(geo)
        self.moe_updates = X.width_updates(adapter, self._narrower) if self.moe and c.mlp else {}
        plan = self.uniform_plan()
        if c.heads and plan.unit_keep == self.units:
            raise RecipeError(
                f"width.heads={c.heads} removes no head: {family} has {self.units} removable attention units "
                f"({self._unit_name()}); the smallest step is {1 / self.units:.3f}."
            )
        if c.compensate == "bias":
            for part, flag in (("mlp", spec.mlp_bias_key), ("heads", spec.attention_bias_key)):
                consumer = next((r for r in adapter.linears(0) if r.role == PARTS[part][1]), None)
                if getattr(c, part) and consumer is not None and consumer.module.bias is None and flag is None:
                    raise RecipeError(
                        f"width.compensate: bias needs a bias on {consumer.local}, which {family}'s config cannot "
                        "give it; use compensate: least_squares (no bias needed) or none."
                    )
        self.sites = None
        if not c.per_block:  # the family's own class must describe the narrowed model exactly
            narrowed, problem = narrowed_skeleton(ctx.model, self.plain_updates(plan))
            if narrowed is not None:
                if c.hidden:
                    self.sites = stream_sites(ctx.model, adapter, narrowed)
                cut = self.sites.cut if self.sites else None
                extra = self._moe_targets(narrowed) if self.moe else {}
                extra.update(self._attention_vectors(plan) if c.heads else {})
                extra.update(self._projector_neuron_shapes(ctx.model))
                problem = plan_mismatch(
                    ctx.model, adapter, narrowed, *self._cut_shapes(plan), cut, plan.hidden_keep, extra
                )
            if problem:
                raise UnsupportedModelError(
                    f"width: {family}'s config cannot describe the narrowed model ({problem}). Nothing was changed; "
                    + (
                        "the stream cannot narrow in this family; use mlp and heads."
                        if c.hidden
                        else "try mlp only, or per_block: true."
                        if c.heads
                        else "please report the architecture."
                    )
                )
        if c.per_block:
            from ..slicegpt.method import SLICEABLE

            if family not in SLICEABLE and family not in ("gemma3_text",):
                raise UnsupportedModelError(f"width.per_block: {family} cannot load per-block widths yet.")

    def _projector_neuron_shapes(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """The shapes the projector's inner-neuron cut leaves (before the stream's), for the whole-model check."""
        neurons = self.sites.projector_neurons if self.sites else None
        if neurons is None:
            return {}
        shapes = {}
        for key, dim in neurons.cut.items():
            shape = list(model.get_parameter(key).shape)
            shape[dim] = neurons.keep
            shapes[key] = tuple(shape)
        return shapes

    def _check_moe(self, family: str) -> None:
        c = self.config
        problem = X.unsupported_experts(self.adapter)
        if problem:
            raise UnsupportedModelError(f"width: {family}: {problem}; remove whole experts with {{method: experts}}.")
        if c.per_block:
            raise UnsupportedModelError(
                f"width.per_block: per-block widths of a mixture of experts are not supported yet ({family}); use a "
                "uniform width."
            )
        if c.mlp and c.compensate == "bias":
            raise RecipeError(
                "width.compensate: bias is not available for expert widths; use least_squares (default) or none."
            )

    def _moe_targets(self, narrowed: nn.Module) -> dict[str, tuple[int, ...]]:
        """Each block's MLP widths as the narrowed config describes them (self.targets), and the fused expert
        tensors' shapes that the cut gives (for the whole-model shape check)."""
        small = ModelAdapter(narrowed)
        self.targets = {i: X.block_widths(small, i) for i in range(small.num_blocks)}
        shapes = {}
        for i in self.adapter.moe_blocks():
            width = self.targets[i].get("experts")
            if width is None:
                continue
            for name, shape in X.narrowed_fused_shapes(self.adapter, i, width).items():
                shapes[f"{self.adapter.block_name(i)}.{name}"] = shape
        return shapes

    def _attention_vectors(self, plan: Plan) -> dict[str, tuple[int, ...]]:
        """Vectors of the attention module (not its linears) with one value per query head (gpt-oss's sinks, cut with
        the heads; the config must describe that too). Norms as wide as all query or all key heads (OLMo 2's and
        OLMoE's q_norm / k_norm over every head) are refused: removing heads changes what they divide by."""
        heads, _ = self._head_counts(plan.unit_keep)
        geo, adapter = self.geo, self.adapter
        old = {geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim}
        shapes = {}
        for i in range(adapter.num_blocks):
            attention = get_submodule(adapter.blocks[i], adapter.spec.attention)
            if attention is None:  # a block without attention (LFM2's convolutions)
                continue
            linears = {f"{r.local}." for r in adapter.linears(i)}
            prefix = f"{adapter.block_name(i)}.{adapter.spec.attention}."
            for name, p in attention.named_parameters():
                owned = any(f"{adapter.spec.attention}.{name}".startswith(lin) for lin in linears)
                if owned or p.dim() != 1:
                    continue
                if "." not in name and p.shape[0] == geo.heads:  # the module's own value per query head
                    shapes[prefix + name] = (heads,)
                elif "." in name and p.shape[0] != geo.head_dim and p.shape[0] in old:  # not a per-head norm
                    raise UnsupportedModelError(
                        f"width.heads: {prefix + name} normalizes all {p.shape[0]} channels of every head at once, "
                        f"so removing heads would change every kept head's output ({self.adapter.family}); use mlp."
                    )
        return shapes

    def _attention_units(self, geo: Geometry) -> tuple[int, int]:
        """(count, channels per unit) of what heads removal takes out: KV groups, or query heads of a single group."""
        if geo.query_units:
            return geo.heads, geo.head_dim
        return geo.kv_heads, geo.group * geo.head_dim

    def _unit_name(self) -> str:
        return "query heads of its single KV head" if self.geo.query_units else "KV groups"

    def uniform_plan(self) -> Plan:
        c, geo = self.config, self.geo
        mlp_keep = self._narrower(geo.intermediate) if c.mlp and geo.intermediate else geo.intermediate
        unit_keep = max(1, round(self.units * (1 - c.heads))) if c.heads else self.units
        plan = Plan(mlp_keep, unit_keep, geo.hidden)
        if c.hidden:
            plan.hidden_keep = self._accepted_hidden(plan, int(geo.hidden * (1 - c.hidden)) // c.round_to * c.round_to)
        return plan

    def _narrower(self, width: int) -> int:
        """An MLP width after removing the mlp fraction, rounded down to round_to (at least round_to)."""
        c = self.config
        return max(c.round_to, int(width * (1 - c.mlp)) // c.round_to * c.round_to)

    def _accepted_hidden(self, plan: Plan, widest: int) -> int:
        """The widest multiple of round_to, at most ``widest``, that the family's config accepts with the plan's
        head counts (Llama's requires hidden_size to be a multiple of num_attention_heads, even with head_dim set)."""
        config, step = self.model_config, self.config.round_to
        for width in range(widest, 0, -step):
            try:
                updated_config(config, self.plain_updates(replace(plan, hidden_keep=width)))
                return width
            except Exception:  # noqa: BLE001 - the config class refuses this width: try the next narrower one
                continue
        return max(step, widest)  # none accepted: the shape check before any work says why

    # ------------------------------------------------------------------ running
    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        c = self.config
        self.preflight(ctx)  # the plan from the model as it is now: an earlier step of the recipe may have changed it
        report = StepReport(c.method, c.to_dict(), c.non_default_dict())
        total_before = sum(p.numel() for p in ctx.model.parameters())
        plans = self.per_block_plans(ctx, report) if c.per_block else None
        uniform = self.uniform_plan()
        details: dict[int, dict] = {}
        self.recorder = StreamRecorder(self.sites, c.compensate == "least_squares") if c.hidden else None
        self.module_names = {id(m): n for n, m in ctx.model.named_modules()}
        stream_cut = None
        if self.needs_calibration:
            engine = ctx.engine()
            watch = self.recorder.watch_projector(ctx.model) if self.recorder is not None else None
            try:
                for step in engine.walk(desc="width"):
                    plan = plans[step.index] if plans else uniform
                    details[step.index] = self._prune_block(ctx, step.index, plan, step)
            finally:
                if watch is not None:
                    watch.remove()
            report.details["block_seconds"] = [round(t, 3) for t in engine.block_seconds]
            if self.recorder is not None:
                stream_cut = self._stream_cut(ctx, engine, uniform, report)
        else:
            for i, block in enumerate(ctx.adapter.blocks):
                plan = plans[i] if plans else uniform
                with ctx.block_context(block):
                    details[i] = self._prune_block(ctx, i, plan, None)
        if ctx.restructure is not None:  # streaming: the narrowed blocks are written; the skeleton follows
            ctx.model = ctx.restructure(self.plain_updates(uniform))
        else:
            ctx.model = self.finalize(ctx.model, ctx.adapter, plans, uniform, stream_cut)
        if stream_cut is not None and stream_cut.errors:
            errors = list(stream_cut.errors.values())
            report.details["hidden_compensation_error"] = {"readers": len(errors), **S.refit_summary(errors)}
        if stream_cut is not None and stream_cut.projector_report:
            report.details["projector_neurons"] = stream_cut.projector_report
        total_after = sum(p.numel() for p in ctx.model.parameters())
        report.details.update(
            {
                "mlp_width": {i: d["mlp"] for i, d in details.items()},
                **(
                    {"expert_width": {i: d["expert_width"] for i, d in details.items() if d["expert_width"]}}
                    if self.moe
                    else {}
                ),
                "attention_heads": {i: d["heads"] for i, d in details.items()},
                "kv_heads": {i: d["kv_heads"] for i, d in details.items()},
                "compensation_error": {i: d["errors"] for i, d in details.items() if d["errors"]},
                "params_removed": total_before - total_after,
                "params_removed_fraction": round(1 - total_after / total_before, 6),
                "plain_checkpoint": not c.per_block,
            }
        )
        report.time_s = time.perf_counter() - start
        logger.info(
            "width: %d -> %d parameters (%.1f%% removed)",
            total_before,
            total_after,
            100 * (1 - total_after / total_before),
        )
        return report

    def _prune_block(self, ctx: PruneContext, index: int, plan: Plan, step: BlockStep | None) -> dict:
        c = self.config
        refs = {r.role: r for r in ctx.adapter.linears(index)}
        stats: dict[str, S.ChannelStats] = {}
        parts = self._block_parts(refs)
        errors = {}
        widths = self.targets[index] if self.moe else {"mlp": plan.mlp_keep}
        if c.mlp and "experts" in widths:
            errors["experts"] = X.narrow_routed_experts(
                step, ctx.adapter, widths["experts"], c.criterion, c.compensate == "least_squares"
            )
        if step is not None:
            extra = []
            if self.recorder is not None:
                readers = {r.name: r.module for r in refs.values() if r.role in READERS}
                extra = self.recorder.hooks(self.module_names, step.block, readers)
            # a block that loses nothing here (hidden only: its cut comes at the end) hands its outputs on as they
            # are; otherwise the engine runs the narrowed block for the next block's inputs
            stats = consumer_statistics(
                step, refs, parts, c.compensate == "least_squares", keep_outputs=not parts, extra=extra
            )
            if self.recorder is not None:
                self.recorder.release()
        for part in ("mlp", "shared"):
            if part in parts:
                consumer = refs[PARTS[part][1]]
                errors[part] = self._cut(
                    refs, part, S.keep_top(self._scores(consumer, stats.get(part)), widths[part]), stats
                )
        attn = get_submodule(ctx.adapter.blocks[index], ctx.adapter.spec.attention) if c.heads else None
        if "heads" in parts:
            q_keep, kv_keep = self._head_keep(refs, stats.get("heads"), plan.unit_keep)
            errors["heads"] = self._cut(refs, "heads", q_keep, stats, kv_keep)
            _keep_head_vectors(attn, q_keep[:: self.geo.head_dim] // self.geo.head_dim, self.geo.heads)
        heads = weight_out_in(refs["o"].module).shape[1] // self.geo.head_dim if "o" in refs else None
        kv = weight_out_in(refs["k"].module).shape[0] // self.geo.head_dim if "k" in refs else None
        if "qkv" in refs and heads and self.spec.heads:  # fused [q; k; v]: what is not q is k and v alike
            kv = (weight_out_in(refs["qkv"].module).shape[0] // self.geo.head_dim - heads) // 2
        if attn is not None and kv:
            _narrow_attention_attributes(attn, heads, kv)
        mlp = refs.get("down") or refs.get("shared_down")
        experts = [r for r in ctx.adapter.experts(index) if r.role == "expert_down"]
        return {
            "mlp": weight_out_in(mlp.module).shape[1] if mlp else None,
            "expert_width": experts[0].in_features if experts else None,
            "heads": heads,
            "kv_heads": kv,
            "errors": {k: v for k, v in errors.items() if v is not None},
        }

    def _scores(self, consumer: LinearRef, stats: S.ChannelStats | None) -> torch.Tensor:
        if stats is not None:
            stats.all_reduce()
        return S.channel_scores(self.config.criterion, stats, weight_out_in(consumer.module))

    def _block_parts(self, refs: dict) -> list[str]:
        """The requested parts this block has (a dense block its MLP, an MoE block its shared expert; heads)."""
        c = self.config
        parts = [p for p in ("mlp", "shared") if c.mlp and PARTS[p][1] in refs]
        return parts + (["heads"] if c.heads and "o" in refs else [])  # LFM2's convolution blocks: no attention

    def _head_keep(self, refs, stats, unit_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Channels of o's input (= q's output rows) and of k/v's output rows to keep."""
        geo = self.geo
        head_scores = S.group_scores(self._scores(refs["o"], stats), geo.head_dim)  # per query head
        if geo.query_units:
            q_heads = S.keep_top(head_scores, unit_keep)
            return S.expand_groups(q_heads, geo.head_dim), torch.arange(geo.head_dim, device=q_heads.device)
        groups = S.keep_top(S.group_scores(head_scores, geo.group), unit_keep)
        return S.expand_groups(groups, geo.group * geo.head_dim), S.expand_groups(groups, geo.head_dim)

    @torch.no_grad()
    def _cut(self, refs, part: str, keep: torch.Tensor, stats, kv_keep: torch.Tensor | None = None):
        """Slice the producers' outputs and the consumer's inputs; compensate in the consumer. Returns the
        consumer's relative output error on the calibration data (least squares) or None."""
        c = self.config
        producers, consumer_role = PARTS[part]
        consumer = refs[consumer_role]
        weight = weight_out_in(consumer.module).float()
        new_weight, shift, error = None, None, None
        st = stats.get(part)
        if c.compensate == "least_squares":
            new_weight, error = S.refit_kept_columns(
                weight, st.take_second_moment(weight.device), keep.to(weight.device)
            )
        elif c.compensate == "bias":
            removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
            removed[keep.to(weight.device)] = False
            removed = removed.nonzero().squeeze(1)
            shift = S.bias_shift(weight, st.mean.to(weight.device), removed)
        for role in producers:
            if role in refs:
                rows = self._producer_rows(role, keep, kv_keep, weight.shape[1])
                keep_outputs(refs[role], rows.to(consumer.device))
        keep_inputs(consumer, keep.to(consumer.device), new_weight, shift)
        return error

    def _stream_cut(self, ctx: PruneContext, engine, plan: Plan, report: StepReport) -> StreamCut:
        """The stream channels kept (scored over the whole walk) and each norm's rescale."""
        recorder, c = self.recorder, self.config
        final = ctx.adapter.spec.final_norm if ctx.adapter.spec else None
        recorder.record_final_norm_inputs(engine.final_hidden, final)
        keep = S.keep_top(recorder.scores(c.criterion), plan.hidden_keep)
        factors = recorder.rescale(keep)
        report.details["hidden_size"] = {"before": self.geo.hidden, "after": plan.hidden_keep}
        report.details["hidden_norm_rescale"] = {
            "min": round(min(factors.values()), 6),
            "max": round(max(factors.values()), 6),
        }
        report.details["hidden_embedding_scale"] = round(self.sites.embedding_scale, 6)
        return StreamCut(
            self.sites,
            keep,
            factors,
            dict(recorder.fed_by_writer),
            recorder.refits(),
            projector_inputs=recorder.projector_statistics(),
            criterion=c.criterion,
        )

    def _producer_rows(self, role: str, keep: torch.Tensor, kv_keep: torch.Tensor | None, width: int) -> torch.Tensor:
        """Output rows a producer keeps: the consumer's kept channels, KV heads' rows for k / v, and both halves of
        a fused gate_up ([gate; up], ``width`` each) or all three parts of a fused qkv ([q; k; v])."""
        if role in ("k", "v"):
            return kv_keep
        if role == "gate_up":
            return torch.cat((keep, keep + width))
        if role == "qkv":
            geo = self.geo
            q, kv = geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim
            kv_keep = kv_keep.to(keep.device)
            return torch.cat((keep, q + kv_keep, q + kv + kv_keep))
        return keep

    # ------------------------------------------------------------------ per-block widths (FLAP)
    def per_block_plans(self, ctx: PruneContext, report: StepReport) -> dict[int, Plan]:
        """Widths per block from one scoring pass over the dense model: scores standardized within each block and
        ranked over the whole model, the same total kept as the uniform plan (at least one unit / round_to neurons
        per block)."""
        c, adapter = self.config, ctx.adapter
        n = adapter.num_blocks
        scores: dict[str, list[torch.Tensor]] = {"mlp": [], "heads": []}
        engine = ctx.engine()
        for step in engine.walk(desc="width scores"):
            refs = {r.role: r for r in adapter.linears(step.index)}
            stats = consumer_statistics(step, refs, ["mlp", "heads"], False, keep_outputs=True)
            scores["mlp"].append(self._scores(refs["down"], stats["mlp"]))
            head = S.group_scores(self._scores(refs["o"], stats["heads"]), self.unit_size)
            scores["heads"].append(head)
        uniform = self.uniform_plan()
        mlp = _allocate(scores["mlp"], uniform.mlp_keep * n, c.round_to) if c.mlp else [uniform.mlp_keep] * n
        units = _allocate(scores["heads"], uniform.unit_keep * n, 1) if c.heads else [uniform.unit_keep] * n
        report.details["per_block_widths"] = {i: {"mlp": mlp[i], "attention_units": units[i]} for i in range(n)}
        return {i: Plan(mlp[i], units[i], uniform.hidden_keep) for i in range(n)}

    # ------------------------------------------------------------------ the saved model
    def finalize(
        self, model: nn.Module, adapter: ModelAdapter, plans, uniform: Plan, stream_cut: StreamCut | None = None
    ) -> nn.Module:
        if plans is None:
            edit = (lambda state: stream_cut.apply(state, model)) if stream_cut is not None else None
            return rebuild_plain(model, self.plain_updates(uniform), edit_state=edit)
        return self._rebuild_per_block(model, adapter)

    def plain_updates(self, plan: Plan) -> dict[str, Any]:
        """The config keys a uniform plan changes (widths, head counts, bias flags for compensation)."""
        c, spec, geo = self.config, self.spec, self.geo
        updates: dict[str, Any] = {}
        if self.moe:
            updates.update(self.moe_updates)  # found on the dense model in preflight
        else:
            updates[spec.mlp_key] = plan.mlp_keep
            updates.update(spec.mlp_fixed)
        if c.compensate == "bias":
            for part, flag in (("mlp", spec.mlp_bias_key), ("heads", spec.attention_bias_key)):
                if getattr(c, part) and flag is not None:
                    updates[flag] = True
        if c.heads:
            heads, kv = self._head_counts(plan.unit_keep)
            updates.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=geo.head_dim)
        if c.hidden:  # head_dim explicit: the attention must not derive it from the narrower stream
            updates.update(hidden_size=plan.hidden_keep, head_dim=geo.head_dim)
        return updates

    def _cut_shapes(self, plan: Plan) -> tuple[dict[str, int], dict[str, int]]:
        """(new output width, new input width) per role after a uniform cut."""
        rows, cols = {}, {}
        if self.config.mlp and self.moe:  # every block of a kind alike (a mismatch is caught by the check)
            for widths in self.targets.values():
                for part, width in widths.items():
                    if part in PARTS:
                        producers, consumer = PARTS[part]
                        rows.update(dict.fromkeys(producers, width))
                        cols[consumer] = width
        elif self.config.mlp:
            rows.update(gate=plan.mlp_keep, up=plan.mlp_keep, gate_up=2 * plan.mlp_keep)
            cols["down"] = plan.mlp_keep
        if self.config.heads:
            heads, kv = self._head_counts(plan.unit_keep)
            rows.update(q=heads * self.geo.head_dim, k=kv * self.geo.head_dim, v=kv * self.geo.head_dim)
            rows["qkv"] = (heads + 2 * kv) * self.geo.head_dim
            cols["o"] = heads * self.geo.head_dim
        return rows, cols

    def _head_counts(self, unit_keep: int) -> tuple[int, int]:
        geo = self.geo
        if geo.query_units:
            return unit_keep, 1
        return unit_keep * geo.group, unit_keep

    def _rebuild_per_block(self, model: nn.Module, adapter: ModelAdapter) -> nn.Module:
        """hf_prune's modeling file (the same one SliceGPT's per-block checkpoints use): the base class, then every
        projection resized to its block's width, biases added where compensation made them."""
        from ..slicegpt.remote import rebuild_with_modeling_file

        resize, add_bias = {}, []
        for i in range(adapter.num_blocks):
            for ref in adapter.linears(i):
                resize[ref.name] = list(weight_out_in(ref.module).shape)
                if ref.module.bias is not None:
                    add_bias.append(ref.name)
        spec = {"resize": resize, "add_bias": add_bias, "attention_groups": self._groups(adapter)}
        return rebuild_with_modeling_file(model, spec, "width")

    def _groups(self, adapter: ModelAdapter) -> dict[str, int]:
        """Query heads per KV head of every attention module (what the runtime sets on it)."""
        out = {}
        for i, block in enumerate(adapter.blocks):
            attn = get_submodule(block, adapter.spec.attention)
            if attn is not None and hasattr(attn, "num_key_value_groups"):
                out[f"{adapter.block_name(i)}.{adapter.spec.attention}"] = int(attn.num_key_value_groups)
        return out


def _keep_head_vectors(attn: nn.Module, heads: torch.Tensor, old: int) -> None:
    """The attention module's own one-value-per-query-head parameters (gpt-oss's sinks) keep the kept heads'."""
    for name, p in list(attn.named_parameters(recurse=False)):
        if p.dim() == 1 and p.shape[0] == old:
            attn._parameters[name] = nn.Parameter(p.data[heads.to(p.device)].clone(), requires_grad=False)


def _narrow_attention_attributes(attn: nn.Module, heads: int, kv: int) -> None:
    """Head counts an attention module reads at run time, for the rest of the walk (the rebuilt model gets them
    from its config): its own attributes, and a private copy of the config where the forward reads it (Phi-3 splits
    its fused qkv by config.num_attention_heads)."""
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = heads // kv
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    config = getattr(attn, "config", None)
    if config is not None and getattr(config, "num_attention_heads", None) not in (None, heads):
        attn.config = copy.copy(config)
        attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv


def consumer_statistics(
    step: BlockStep, refs: dict, parts: list[str], second_moment: bool, keep_outputs: bool, extra: list = ()
):
    """Run the block once with the consumers' (down, o) inputs recorded (and the ``extra`` hooks on); with
    ``keep_outputs`` the block's outputs are handed to the engine as the next block's inputs."""
    stats, handles = {}, list(extra)
    with hooks(handles):  # removed on any error, the extra hooks included
        for part in parts:
            consumer = refs[PARTS[part][1]]
            stats[part] = st = S.ChannelStats(consumer.in_features, consumer.device, second_moment)
            handles.append(consumer.module.register_forward_pre_hook(lambda m, args, st=st: st.update(args[0])))
        outputs = step.forward(keep_outputs=keep_outputs)
    if keep_outputs:
        step.info["outputs"] = outputs
    return stats


def _allocate(block_scores: list[torch.Tensor], total_keep: int, multiple: int) -> list[int]:
    """How many units each block keeps: the ``total_keep`` best of all blocks' units by score standardized within
    its block (FLAP), each block at least ``multiple``, counts rounded to ``multiple``."""
    block_scores = [s.detach().float().cpu() for s in block_scores]  # blocks may sit on different devices
    standardized = [(s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else s * 0 for s in block_scores]
    flat = torch.cat(standardized)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(standardized)])
    best = torch.argsort(flat, descending=True, stable=True)[:total_keep]
    counts = torch.bincount(owner[best], minlength=len(block_scores)).tolist()
    sizes = [s.numel() for s in block_scores]
    return [min(size, max(multiple, int(math.floor(k / multiple + 0.5)) * multiple)) for k, size in zip(counts, sizes)]
