"""Unstructured / N:M weight pruning over the block-by-block engine, for linears and routed experts alike.

A weight-pruning method only says which input statistics it needs (``make_stats``) and how to turn a weight and
those statistics into a pruned weight (``prune_weight``, pure math). This module runs it over the model: targets,
the block-by-block engine (one pass in true-sequential order when the calibration batch fits, two passes
otherwise), the routed experts' statistics (``expert_calibration.py``), and the checks after pruning.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed
from ..adapters import ROUTER_ROLE, LinearRef, WeightRef
from ..calibration.engine import BlockStep, hooks
from ..calibration.expert_stats import ExpertStatistics
from ..calibration.experts import ALL, ROUTED
from ..errors import PruningCheckError, RecipeError
from ..report import ModuleReport, StepReport
from ..utils import available_memory_bytes, human_bytes, logger
from .base import PruningMethod, StepConfig
from .context import PruneContext
from .masks import Structure, dense_groups, expected_pruned, parse_structure, row_slabs
from .reconstruction import ReconstructConfig, parse_reconstruct, reconstruct_block
from .targets import Coverage, select_targets, split_refs

MOE_CALIBRATION = (ROUTED, ALL)
PER_BLOCK_DETAILS = ("reconstruction",)  # report entries keyed by block, carried over a resume


@dataclass
class WeightPruningConfig(StepConfig):
    """Shared keys of the weight-pruning methods.

    Args:
        sparsity: fraction of weights to remove in each target linear, in [0, 1). Implied by an N:M structure.
        structure: ``unstructured`` or ``N:M`` (N weights kept in every M consecutive inputs, e.g. ``2:4``).
        targets: roles (q, k, v, qkv, o, gate, up, gate_up, down; expert_gate, expert_up, expert_down for routed
            experts; shared_gate, shared_up, shared_down; router) or regexes on names; default every linear and
            every routed expert's matrix of the decoder blocks, routers excepted. Embeddings and lm_head are never
            targets.
        ignore: roles or regexes to leave dense.
        true_sequential: score each linear on the inputs of the already pruned part of its block (one forward per
            block when the calibration batch fits in memory); False scores every linear on the dense block's inputs.
        sparsity_profile: ``uniform`` (every block at ``sparsity``) or ``owl``: outlier-weighted layerwise sparsity
            (Yin et al., 2024), blocks with more activation outliers kept denser, averaging to ``sparsity``.
        owl_m: OWL's outlier threshold, a multiple of the block's mean |W| * ||X|| score.
        owl_lambda: OWL's lambda: block sparsities span at most 2 * lambda, each within ``sparsity`` +- 2 * lambda
            (+- lambda when the outlier ratios spread evenly), and average exactly to ``sparsity``.
        component: for vision-language models: ``language`` (default), ``vision`` (the vision tower) or ``all``.
        moe_calibration: mixture-of-experts models: ``routed`` (each expert's statistics from the tokens the router
            sends to it) or ``all`` (every token also goes through every expert, for statistics only; the block's
            output is unchanged).
        moe_min_tokens: an expert routed fewer calibration tokens than this is calibrated on every token of its
            block instead (reported under ``moe.fallback_experts``).
        moe_stats_memory: GiB of routed experts' statistics held at once where they are collected before pruning
            (several calibration chunks, or ``true_sequential: false``): the experts are calibrated and pruned in
            groups that fit, one pass over the block each (same result; ``moe_stats_passes`` in the report). Default:
            a quarter of the memory free on the experts' device.
        reconstruct: after a block's targets are masked, refit their surviving weights (masks fixed) so that the
            pruned block's output matches the dense block's output on the same calibration inputs; ``true`` or a
            mapping of settings (``epochs``, ``lr``, ``batch_size``, ``seed``: see ``ReconstructConfig``). Kept per
            block only where it lowered the block's calibration error; the report has both errors per block.
    """

    sparsity: float | None = None
    structure: str = "unstructured"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    true_sequential: bool = True
    sparsity_profile: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    component: str = "language"
    moe_calibration: str = "routed"
    moe_min_tokens: int = 16
    moe_stats_memory: float | None = None
    reconstruct: Any = False

    def validate(self) -> None:
        settings = parse_reconstruct(self.reconstruct)
        self.reconstruct = settings.to_dict() if settings is not None else False
        try:
            structure = parse_structure(self.structure)
        except ValueError as exc:
            raise RecipeError(str(exc)) from exc
        if structure.is_nm:
            if self.sparsity is not None and abs(self.sparsity - structure.sparsity) > 1e-9:
                raise RecipeError(
                    f"sparsity={self.sparsity} contradicts structure {structure} (which keeps {structure.n} of every "
                    f"{structure.m} weights: sparsity {structure.sparsity:g}); drop sparsity or make them agree."
                )
            self.sparsity = structure.sparsity
        if self.sparsity is None:
            raise RecipeError(f"{self.method}: 'sparsity' is required for unstructured pruning, e.g. sparsity: 0.5.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise RecipeError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        self.sparsity = float(self.sparsity)
        if self.component not in ("language", "vision", "all"):
            raise RecipeError(f"component must be 'language', 'vision' or 'all', got {self.component!r}.")
        if self.moe_calibration not in MOE_CALIBRATION:
            raise RecipeError(
                f"moe_calibration must be one of {', '.join(MOE_CALIBRATION)}, got {self.moe_calibration!r}."
            )
        if (
            isinstance(self.moe_min_tokens, bool)
            or not isinstance(self.moe_min_tokens, int)
            or self.moe_min_tokens < 0
        ):
            raise RecipeError(f"moe_min_tokens must be a non-negative integer, got {self.moe_min_tokens!r}.")
        if self.moe_stats_memory is not None and (
            isinstance(self.moe_stats_memory, bool)
            or not isinstance(self.moe_stats_memory, (int, float))
            or not self.moe_stats_memory > 0
        ):
            raise RecipeError(f"moe_stats_memory must be a positive number of GiB, got {self.moe_stats_memory!r}.")
        if self.sparsity_profile not in ("uniform", "owl"):
            raise RecipeError(f"sparsity_profile must be 'uniform' or 'owl', got {self.sparsity_profile!r}.")
        if self.sparsity_profile == "owl":
            if structure.is_nm:
                raise RecipeError(
                    f"sparsity_profile: owl gives each block its own sparsity, but {structure} fixes every block at "
                    f"{structure.sparsity:g}. Use structure: unstructured with OWL, or drop sparsity_profile."
                )
            lam = self.owl_lambda
            if not 0 < lam or self.sparsity + 2 * lam >= 1 or self.sparsity - 2 * lam < 0:
                raise RecipeError(
                    f"owl_lambda={lam} must be > 0 and keep sparsity +- 2 * owl_lambda inside [0, 1) "
                    f"(sparsity={self.sparsity}); lower owl_lambda."
                )
            if not self.owl_m > 0:
                raise RecipeError(f"owl_m must be > 0, got {self.owl_m}.")
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise RecipeError(f"{key} must be a list of roles or regexes, got {value!r}.")

    @property
    def parsed_structure(self) -> Structure:
        return parse_structure(self.structure)

    @property
    def reconstruction(self) -> ReconstructConfig | None:
        return parse_reconstruct(self.reconstruct)


class _StopBlock(Exception):
    """Ends a block's forward once the group of targets being calibrated has seen its inputs."""


class _SharedStats:
    """Statistics shared by linears that read the same input tensor (q/k/v, gate/up): updated once per chunk."""

    def __init__(self, stats):
        self.stats = stats
        self._last = None

    def holds(self, x: torch.Tensor) -> bool:
        return self._last is not None and self._last() is x

    def update(self, x: torch.Tensor) -> None:
        if self.holds(x):
            return
        self._last = weakref.ref(x)
        if self.stats is not None:
            self.stats.update(x)


class WeightPruningMethod(PruningMethod):
    """Unstructured / N:M weight pruning over the block-by-block engine. Subclasses give the math."""

    config: WeightPruningConfig
    comparison_group: str = "row"  # masks compared per output row ("row") or over the whole matrix ("layer")
    uses_statistics: bool = True  # False: the masks need no calibration data (reconstruction still does)
    float_weight: bool = True  # prune_weight gets a float32 copy (False: the weight as stored; it converts itself)

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.uses_statistics or self.config.reconstruction is not None

    # ---- the method's math ------------------------------------------------------------------------------
    def make_stats(self, ref: WeightRef):
        """A running-statistics object with ``update(x)`` for this target's inputs, or None if not needed."""
        return None

    @abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, stats, sparsity: float, structure: Structure, name: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Given the (out, in) float32 weight and statistics of the target ``name``, return
        (new weight or None, mask of pruned entries)."""

    # ---- orchestration ----------------------------------------------------------------------------------
    def components(self, ctx: PruneContext) -> list[PruneContext]:
        comp = self.config.component
        if comp == "language":
            return [ctx]
        if not ctx.adapter.is_vlm:
            raise RecipeError(f"component={comp!r} needs a vision-language model; this is {ctx.adapter.family}.")
        return [ctx.for_component("vision")] + ([ctx] if comp == "all" else [])

    def preflight(self, ctx: PruneContext) -> None:
        for part in self.components(ctx):
            self._preflight_one(part)

    def _preflight_one(self, ctx: PruneContext) -> None:
        structure = self.config.parsed_structure
        if self.config.reconstruction is not None and distributed.active():
            raise RecipeError(
                "reconstruct is not available under torchrun yet (each rank would refit on its own windows); "
                "run the step in one process, or drop reconstruct."
            )
        refs = select_targets(ctx.adapter, self.config.targets, self.config.ignore)
        if structure.is_nm:
            bad = [r for r in refs if r.in_features % structure.m]
            if bad:
                raise RecipeError(
                    f"N:M structure {structure} needs every target's input width divisible by {structure.m}; "
                    f"{bad[0].name} has {bad[0].in_features} inputs. Use another M, or ignore: "
                    f"['{bad[0].role}']."
                )

    def block_sparsities(
        self, ctx: PruneContext, refs_by_block: dict[int, list[WeightRef]], report: StepReport
    ) -> dict[int, float]:
        """Sparsity per block: uniform, or OWL's outlier-weighted profile (one extra dense pass to measure it)."""
        if self.config.sparsity_profile != "owl":
            return {i: self.config.sparsity for i in refs_by_block}
        from .owl import measure_outlier_ratios, owl_sparsities

        c = self.config
        ratios = measure_outlier_ratios(
            ctx.engine(), ctx.adapter, refs_by_block, c.owl_m, c.moe_calibration, c.moe_min_tokens
        )
        blocks = sorted(ratios)
        values = owl_sparsities([ratios[i] for i in blocks], self.config.sparsity, self.config.owl_lambda)
        report.details["owl_outlier_ratio"] = {i: round(ratios[i], 6) for i in blocks}
        return dict(zip(blocks, values))

    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        report = StepReport(self.config.method, self.config.to_dict(), self.config.non_default_dict())
        for part in self.components(ctx):
            coverage = self._run_one(part, report)
            ctx.calibration_info = ctx.calibration_info or part.calibration_info
            self._report_coverage(part, coverage, report)
        report.time_s = time.perf_counter() - start
        return report

    def _report_coverage(self, ctx: PruneContext, coverage: Coverage, report: StepReport) -> None:
        """Nothing silently dense: sparsity over the targets and over every block weight, and what was left."""
        cov = coverage.result()
        key = "coverage" if ctx.adapter.component == "language" else f"coverage_{ctx.adapter.component}"
        report.details[key] = cov
        for entry in cov["untouched"]:
            log = logger.info if entry["role"] == ROUTER_ROLE else logger.warning  # routers: left dense by design
            log(
                "%s left %s dense (%s, %d blocks, %d weights): %s.",
                self.config.method,
                entry["name"],
                entry["role"] or "no role",
                len(entry["blocks"]),
                entry["numel"],
                entry["include_with"],
            )

    def _run_one(self, ctx: PruneContext, report: StepReport) -> Coverage:
        refs = select_targets(ctx.adapter, self.config.targets, self.config.ignore)
        coverage = Coverage(ctx.adapter, refs)
        by_block: dict[int, list[WeightRef]] = {}
        for ref in refs:
            by_block.setdefault(ref.block, []).append(ref)
        sparsities = self._planned_sparsities(ctx, by_block, report)
        if sparsities and len(set(sparsities.values())) > 1:
            report.details["block_sparsity"] = {int(k): round(v, 6) for k, v in sparsities.items()}
        start, commit = self._resume_point(ctx, report, coverage)

        if not self.needs_calibration:
            for i, block in enumerate(ctx.adapter.blocks):
                if i < start:
                    continue
                with ctx.block_context(block):
                    report.modules += [self._prune_ref(r, None, sparsities[i]) for r in by_block.get(i, [])]
                    coverage.add_block(i)
                    if commit is not None:
                        commit(i, block, None)
            return coverage
        if start >= ctx.adapter.num_blocks:  # killed after the last block's commit: nothing left to walk
            return coverage
        engine = ctx.engine()
        if start:
            engine.start, engine.resume_inputs = start, ctx.work[0].inputs(start)
        engine.after_block = commit
        # the order matters only to masks computed from statistics (magnitude + reconstruct: one pass is enough)
        sequential = self.config.true_sequential and self.uses_statistics
        if sequential and distributed.active() and self._per_expert_linears(ctx):
            sequential = False
            logger.warning(
                "Per-expert MLP modules are called only on the ranks that routed tokens to them, so a data-parallel "
                "run collects their statistics first and prunes after (two passes per block)."
            )
        # one pass only where every rank has one chunk (windows shard unevenly; the ranks' collectives must pair up)
        one_chunk = all(n == 1 for n in distributed.all_gather_objects(engine.num_chunks))
        if not sequential:
            report.details["order"] = "parallel (two passes)"
        elif one_chunk:
            report.details["order"] = "true-sequential (one pass per block)"
        else:  # the same masks as one chunk: each group of linears sees every chunk before it is pruned
            report.details["order"] = f"true-sequential (one pass per input group, {engine.num_chunks} chunks)"
        reconstruction = self.config.reconstruction
        moe_summary: dict[int, dict] = {}
        for step in engine.walk(desc=f"{self.config.method}"):
            block_refs = by_block.get(step.index)
            if not block_refs:
                coverage.add_block(step.index)
                continue
            s = sparsities[step.index]
            experts = self._expert_statistics(ctx, step, block_refs)
            dense_outputs = step.forward() if reconstruction is not None else None
            if sequential and one_chunk:
                step.info["outputs"] = self._one_pass(step, block_refs, s, report, experts)
            elif sequential:
                self._staged_passes(step, block_refs, s, report, experts)
            else:
                self._two_pass(step, block_refs, s, report, experts)
            if reconstruction is not None:
                self._reconstruct(step, block_refs, dense_outputs, reconstruction, report)
            del dense_outputs
            if experts is not None:
                moe_summary[step.index] = experts.summary()
            coverage.add_block(step.index)
        report.details["block_seconds"] = [round(t, 3) for t in engine.block_seconds]
        if moe_summary:
            report.details["moe"] = self._moe_details(moe_summary)
        return coverage

    def _planned_sparsities(self, ctx: PruneContext, by_block, report: StepReport) -> dict[int, float]:
        """Block sparsities (uniform or OWL's), decided once per step: a resumed step reuses the saved ones (OWL's
        dense pass would see the blocks already pruned)."""
        scratch = StepReport(self.config.method, {})

        def compute() -> dict:
            values = self.block_sparsities(ctx, by_block, scratch)
            return {"values": {str(k): v for k, v in values.items()}, "details": scratch.details}

        planned = ctx.work[0].plan(ctx.work[1], "sparsities", compute) if ctx.work else compute()
        report.details.update(planned["details"])
        return {int(k): v for k, v in planned["values"].items()}

    def _resume_point(self, ctx: PruneContext, report: StepReport, coverage: Coverage):
        """(first block to prune, the after-block commit) of a resumable prune; (0, None) otherwise. Blocks a killed
        run finished are counted from their restored weights, their module reports from the saved ones."""
        if not ctx.work:
            return 0, None
        work, index = ctx.work
        start = work.start(index)
        partial = work.partial_report(index) or {}
        report.modules += [ModuleReport.from_dict(m) for m in partial.get("modules", [])]
        for i in range(start):
            with ctx.block_context(ctx.adapter.blocks[i]):
                coverage.add_block(i)

        for key, value in partial.get("details", {}).items():  # per-block entries of the finished blocks
            if isinstance(value, dict):
                report.details.setdefault(key, {}).update({int(k): v for k, v in value.items()})

        def commit(i: int, block, next_inputs) -> None:
            modules = [dataclasses.asdict(m) for m in report.modules]
            per_block = {k: v for k, v in report.details.items() if k in PER_BLOCK_DETAILS}
            work.commit_block(index, i, block, next_inputs, {"modules": modules, "details": per_block})

        return start, commit

    def _reconstruct(
        self, step: BlockStep, refs: list[WeightRef], dense_outputs, settings: ReconstructConfig, report: StepReport
    ) -> None:
        """Refit the block's surviving weights towards the dense block's outputs, then check every target again;
        the block's outputs after the refit (or the masked ones, if it did not help) go to the next block."""
        pruned = {r.name: r.weight() == 0 for r in refs}
        entry, step.info["outputs"] = reconstruct_block(
            step, refs, dense_outputs, settings, step.info.pop("outputs", None)
        )
        structure = self.config.parsed_structure
        for ref in refs:
            verify_refit(ref, ref.weight(), pruned.pop(ref.name), structure)
        report.details.setdefault("reconstruction", {})[step.index] = entry
        logger.info(
            "block %d: output error %.4g -> %.4g (%s, %d steps, %.1f s)",
            step.index,
            entry["error_before"],
            entry["error_refit"],
            "kept" if entry["kept"] else "discarded: not lower",
            entry["steps"],
            entry["seconds"],
        )

    @staticmethod
    def _per_expert_linears(ctx: PruneContext) -> bool:
        return any(isinstance(r, LinearRef) for i in ctx.adapter.moe_blocks() for r in ctx.adapter.experts(i))

    def _expert_statistics(self, ctx: PruneContext, step: BlockStep, refs: list[WeightRef]):
        expert_refs = split_refs(refs)[1]
        if not expert_refs:
            return None
        c = self.config
        spec = ctx.adapter.moe_spec(step.index)
        return ExpertStatistics(step, spec, expert_refs, self.make_stats, c.moe_calibration, c.moe_min_tokens)

    def _moe_details(self, summary: dict[int, dict]) -> dict:
        fallback = {i: s["fallback_experts"] for i, s in summary.items() if s["fallback_experts"]}
        if fallback:
            logger.warning(
                "%d expert(s) received fewer than %d routed calibration tokens and were calibrated on every token of "
                "their block instead: %s",
                sum(len(v) for v in fallback.values()),
                self.config.moe_min_tokens,
                {i: v[:8] for i, v in fallback.items()},
            )
        return {
            "calibration": self.config.moe_calibration,
            "min_tokens": self.config.moe_min_tokens,
            "tokens_per_expert": {i: s["tokens_per_expert"] for i, s in summary.items()},
            "fallback_experts": fallback,
        }

    def _one_pass(self, step: BlockStep, refs, sparsity: float, report: StepReport, experts):
        """Prune each target as its inputs arrive (linears in a pre-hook, experts in the experts module's pre-hook);
        the block's outputs come out pruned."""
        linears = split_refs(refs)[0]
        by_input: dict[int, _SharedStats] = {}
        done: set[str] = set()

        def prune(ref: WeightRef, stats) -> None:
            if ref.name not in done:
                report.modules.append(self._prune_ref(ref, stats, sparsity))
                done.add(ref.name)

        def make_hook(ref: LinearRef):
            def hook(module, args):
                if ref.name in done:
                    return
                shared = self._shared_for(args[0], ref, by_input)
                shared.update(args[0])
                prune(ref, shared.stats)

            return hook

        with hooks([r.module.register_forward_pre_hook(make_hook(r)) for r in linears]):
            outputs = experts.prune_during(prune) if experts is not None else step.forward()
        self._prune_missed(refs, done, report)
        return outputs

    def _staged_passes(self, step: BlockStep, refs, sparsity: float, report: StepReport, experts) -> None:
        """True-sequential order when the calibration runs in several chunks: one pass over every chunk per group of
        targets that read the same input (q/k/v, then o, then gate/up, then down; the routed experts as one group),
        each pass stopping at the first target not of its group; the group is pruned after its pass, so the next
        group is calibrated on the pruned group's outputs. The masks equal the one-chunk run's up to summation order;
        the engine then runs the pruned block for the next block's inputs."""
        linears, expert_refs = split_refs(refs)
        done: set[str] = set()
        experts_module = None
        if experts is not None:  # fused tensors: the experts module is called; a ModuleList: its parent is
            experts_module = experts.experts if experts.fused else experts._parent.module
        while True:
            if experts_module is None and all(r.name in done for r in linears):
                break  # nothing left to calibrate: no pass over the pruned block
            group, stats, reached_experts = self._next_group(
                step, [r for r in linears if r.name not in done], experts_module
            )
            if reached_experts:  # gate/up over every chunk, pruned; then down on the pruned gate/up's outputs
                readers = [r for r in expert_refs if r.role != "expert_down"]
                down = [r for r in expert_refs if r.role == "expert_down"]
                for part in (readers, down):
                    if not part:
                        continue
                    stage = ExpertStatistics(
                        step, experts.spec, part, self.make_stats, experts.mode, experts.min_tokens
                    )
                    for group in self._expert_groups(stage, report):  # one pass per group of experts
                        stage.accumulate(experts=group)
                        for ref in part:
                            if ref.expert in group and ref.name in stage.stats:
                                report.modules.append(self._prune_ref(ref, stage.stats.pop(ref.name), sparsity))
                                done.add(ref.name)
                    experts.tokens, experts.fallback = stage.tokens, stage.fallback
                experts_module = None
                continue
            if not group:
                break
            for ref in group:
                report.modules.append(self._prune_ref(ref, stats, sparsity))
                done.add(ref.name)
        self._prune_missed(refs, done, report)

    def _next_group(self, step: BlockStep, pending: list[LinearRef], experts_module):
        """One pass over every chunk that calibrates the first group of ``pending`` targets the block reaches (those
        reading the same input tensor). Returns (the group, its statistics, whether the experts module came first)."""
        group: dict[str, LinearRef] = {}
        state: dict[str, Any] = {"input": None, "stats": None, "first": True, "experts": False}

        def linear_hook(ref: LinearRef):
            def hook(module, args):
                x = args[0]
                if state["first"] and not state["experts"]:
                    if state["input"] is None:
                        state["input"], state["stats"] = weakref.ref(x), _SharedStats(self.make_stats(ref))
                    if state["input"]() is x:
                        group[ref.name] = ref
                if ref.name not in group:
                    raise _StopBlock
                state["stats"].update(x)

            return hook

        def experts_hook(module, args, kwargs):
            if state["first"] and state["input"] is None:
                state["experts"] = True
            raise _StopBlock  # the experts' statistics come from their own pass

        handles = [r.module.register_forward_pre_hook(linear_hook(r)) for r in pending]
        if experts_module is not None:
            handles.append(experts_module.register_forward_pre_hook(experts_hook, with_kwargs=True))
        with hooks(handles):
            for j in range(step.num_chunks):
                state["first"] = j == 0
                try:
                    step.forward_chunk(j)
                except _StopBlock:
                    pass
                if state["experts"]:
                    return [], None, True
        stats = state["stats"].stats if state["stats"] is not None else None
        return list(group.values()), stats, False

    def _two_pass(self, step: BlockStep, refs, sparsity: float, report: StepReport, experts) -> None:
        """Collect statistics over every chunk of the dense block, then prune; the engine re-runs the block."""
        linears = split_refs(refs)[0]
        assigned: dict[str, _SharedStats] = {}
        by_input: dict[int, _SharedStats] = {}

        def make_hook(ref: LinearRef):
            def hook(module, args):
                shared = assigned.get(ref.name)
                if shared is None:
                    shared = assigned[ref.name] = self._shared_for(args[0], ref, by_input)
                shared.update(args[0])

            return hook

        groups = self._expert_groups(experts, report) if experts is not None else []
        with hooks([r.module.register_forward_pre_hook(make_hook(r)) for r in linears]):
            if experts is not None:
                experts.accumulate(experts=groups[0])
            else:
                step.forward(keep_outputs=False)
        by_input.clear()  # from here on each statistics object is referenced by its linears only, and freed with them
        stats = {name: shared.stats for name, shared in assigned.items()}
        first, ready = len(report.modules), []
        for k, group in enumerate(groups):  # each group's experts pruned before the next group's pass; the linears
            if k:  # last, so every pass sees the dense attention (an expert's inputs do not depend on other experts)
                experts.accumulate(experts=group)
            part = [r for r in refs if r.expert in group and r.name in experts.stats]
            self._prune_ready(part, {r.name: experts.stats.pop(r.name) for r in part}, sparsity, report)
            ready += part
        part = [ref for ref in refs if ref.name in stats]
        self._prune_ready(part, stats, sparsity, report)
        ready += part
        order = {ref.name: i for i, ref in enumerate(refs)}
        report.modules[first:] = sorted(report.modules[first:], key=lambda m: order.get(m.name, len(order)))
        self._prune_missed(refs, {ref.name for ref in ready}, report)

    def _prune_ready(self, refs: list[WeightRef], stats: dict, sparsity: float, report: StepReport) -> None:
        if distributed.active():
            self._prune_across_ranks(refs, stats, sparsity, report)
        else:
            for ref in refs:
                report.modules.append(self._prune_ref(ref, stats.pop(ref.name), sparsity))

    def block_work_bytes(self, block_parameters: int, activation_bytes: int) -> int:
        """Reconstruction: float32 masters, Adam's two moments, gradients, the masked values and the free mask per
        parameter (about 21 bytes), and the dense targets and refit outputs beside the block's inputs and outputs."""
        if self.config.reconstruction is None:
            return 0
        return 21 * block_parameters + 2 * activation_bytes

    def stats_bytes(self, ref: WeightRef) -> int:
        """Bytes of the statistics ``make_stats`` keeps for ``ref`` (per-input-channel float32 by default)."""
        return 4 * ref.in_features

    def _expert_groups(self, experts: ExpertStatistics, report: StepReport) -> list[set[int]]:
        """The block's targeted experts in groups whose statistics fit ``moe_stats_memory`` GiB (default: a quarter
        of the memory free on their device), collected and pruned one group per pass."""
        c = self.config
        if c.moe_stats_memory is not None:
            budget = int(c.moe_stats_memory * 2**30)
        else:  # the smallest rank's: every rank must walk the same groups (their collectives pair up)
            device = next(iter(experts.by_expert.values()))[0].device
            budget = min(distributed.all_gather_objects(available_memory_bytes(device) // 4))
        groups = experts.groups(self.stats_bytes, budget)
        if len(groups) > 1:
            passes = report.details.setdefault("moe_stats_passes", {})
            before = passes.get(experts.step.index, 0)  # a staged block groups its experts twice (gate/up, down)
            passes[experts.step.index] = max(before, len(groups))
            if len(groups) > 8 >= before:  # once per block
                logger.warning(
                    "block %d: the routed experts' statistics need %d passes over the block to fit %s; set "
                    "moe_stats_memory (GiB) higher, or calibrate in one chunk, for fewer.",
                    experts.step.index,
                    len(groups),
                    human_bytes(budget),
                )
        return groups

    def solve_cost(self, ref: WeightRef) -> float:
        """Relative cost of pruning one target (weight-parallel solving balances it over the ranks)."""
        return float(ref.weight().numel())

    def shared_solve_cost(self, refs: list[WeightRef]) -> float:
        """Relative cost of pruning targets that share their statistics, on one rank."""
        return sum(self.solve_cost(r) for r in refs)

    def _prune_across_ranks(self, refs: list[WeightRef], stats: dict, sparsity: float, report: StepReport) -> None:
        """Weight-parallel solving: the block's targets are spread over the ranks by cost, each rank prunes its
        share, and every pruned weight is broadcast from the rank that pruned it."""
        for ref in refs:  # the same order on every rank; objects shared by several targets reduce once
            if stats[ref.name] is not None:
                stats[ref.name].all_reduce()
        # targets sharing statistics (q/k/v, gate/up) are one job: one rank factors them once
        jobs: dict[int, list[int]] = {}
        for i, ref in enumerate(refs):
            key = id(stats[ref.name]) if stats[ref.name] is not None else -1 - i
            jobs.setdefault(key, []).append(i)
        members = list(jobs.values())
        costs = [self.shared_solve_cost([refs[i] for i in job]) for job in members]
        job_owners = distributed.balanced_assignment(costs, distributed.world_size())
        owners = [0] * len(refs)
        for job, owner in zip(members, job_owners):
            for i in job:
                owners[i] = owner
        mine = {
            r.name: self._prune_ref(r, stats[r.name], sparsity)
            for r, o in zip(refs, owners)
            if o == distributed.rank()
        }
        for ref, owner in zip(refs, owners):
            distributed.broadcast_(ref.weight(), owner)
        parts = distributed.all_gather_objects(mine)
        merged = {k: v for part in parts for k, v in part.items()}
        report.modules += [merged[r.name] for r in refs]
        solves = report.details.setdefault("solves_per_rank", [0] * len(parts))
        for r, part in enumerate(parts):
            solves[r] += len(part)

    def _shared_for(self, x: torch.Tensor, ref: WeightRef, by_input: dict[int, _SharedStats]) -> _SharedStats:
        for key in [k for k, v in by_input.items() if v._last is not None and v._last() is None]:
            del by_input[key]  # its input is gone, so no later linear can share these statistics: free them
        shared = by_input.get(id(x))
        if shared is None or not shared.holds(x):
            shared = by_input[id(x)] = _SharedStats(self.make_stats(ref))
        return shared

    def _prune_missed(self, refs, done, report) -> None:
        missed = [r for r in refs if r.name not in done]
        if missed:
            logger.warning(
                "%d target(s) received no calibration input and stay dense: %s",
                len(missed),
                ", ".join(r.name for r in missed[:5]),
            )
            report.details.setdefault("not_called", []).extend(r.name for r in missed)

    @torch.no_grad()
    def _prune_ref(self, ref: WeightRef, stats, sparsity: float) -> ModuleReport:
        structure = self.config.parsed_structure
        if stats is not None:
            stats.all_reduce()  # a data-parallel run: the statistics of every rank's windows (once per object)
        weight = ref.weight()
        given = weight.float().contiguous() if self.float_weight else weight
        new_weight, mask = self.prune_weight(given, stats, sparsity, structure, ref.name)
        del given
        if new_weight is not None:
            weight.copy_(new_weight.to(weight.dtype).masked_fill(mask, 0))
        else:
            weight.masked_fill_(mask, 0)
        return verify_pruned(ref, weight, mask, sparsity, structure, self.comparison_group)


CHECK_ELEMENTS = 1 << 22  # the checks read a slab of rows at a time: a few MiB of temporaries for any matrix


def _pattern_counts(weight: torch.Tensor, mask: torch.Tensor, structure: Structure) -> dict[str, int]:
    """One pass over slabs of rows: entries under ``mask``, non-zeros among them, zeros, non-finite values and
    N:M groups with too many non-zeros (summed on the weight's device, read back once)."""
    names = ("masked", "masked_nonzero", "zeros", "non_finite", "nm_violations")
    totals = torch.zeros(len(names), dtype=torch.int64, device=weight.device)
    for rows in row_slabs(tuple(weight.shape), CHECK_ELEMENTS):
        w, m = weight[rows], mask[rows]
        nonzero = w != 0
        totals[0] += m.sum()
        totals[1] += (nonzero & m).sum()
        totals[2] += w.numel() - nonzero.sum()
        totals[3] += w.numel() - torch.isfinite(w).sum()
        if structure.is_nm:
            totals[4] += dense_groups(nonzero, structure.n, structure.m)
    return dict(zip(names, totals.tolist()))


def verify_refit(ref: WeightRef, weight: torch.Tensor, zeros: torch.Tensor, structure: Structure) -> None:
    """The checks after reconstruction: every zero the masking left is still zero (so the pruned count and the N:M
    pattern are unchanged), finite values."""
    counts = _pattern_counts(weight, zeros, structure)
    if counts["masked_nonzero"]:
        raise PruningCheckError(f"{ref.name}: reconstruction changed the pruned pattern; nothing will be saved.")
    if counts["non_finite"]:
        raise PruningCheckError(f"{ref.name}: NaN or inf after reconstruction; nothing will be saved.")
    if counts["nm_violations"]:
        raise PruningCheckError(f"{ref.name}: the {structure} pattern does not hold after reconstruction.")


def verify_pruned(
    ref: WeightRef, weight: torch.Tensor, mask: torch.Tensor, sparsity: float, structure: Structure, group: str
) -> ModuleReport:
    """The checks after pruning one target: exact pruned count, zeros where the mask says, N:M, finite values."""
    expected = expected_pruned(tuple(weight.shape), sparsity, structure, group)
    counts = _pattern_counts(weight, mask, structure)
    pruned = counts["masked"]
    if pruned != expected:
        raise PruningCheckError(f"{ref.name}: the mask prunes {pruned} weights, expected exactly {expected}.")
    if counts["masked_nonzero"]:
        raise PruningCheckError(f"{ref.name}: weights under the mask are not zero after pruning.")
    if counts["non_finite"]:
        raise PruningCheckError(f"{ref.name}: NaN or inf in the pruned weight; nothing will be saved.")
    if counts["nm_violations"]:
        raise PruningCheckError(f"{ref.name}: the {structure} pattern does not hold after pruning.")
    return ModuleReport(ref.name, ref.role, tuple(weight.shape), sparsity, counts["zeros"] / weight.numel(), pruned)
