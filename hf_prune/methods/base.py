"""What every pruning method shares: the run context, the step config, and the weight-pruning orchestration.

A weight-pruning method only says which input statistics it needs (``make_stats``) and how to turn a weight and
those statistics into a pruned weight (``prune_weight``, pure math). This module runs it over the model:
targets, the block-by-block engine (one pass in true-sequential order when the calibration batch fits, two passes
otherwise), and the checks after pruning.
"""

from __future__ import annotations

import dataclasses
import re
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import LINEAR_ROLES, LinearRef, ModelAdapter, in_features, weight_out_in
from ..calibration.config import DEFAULT_SEQLEN, CalibrationConfig
from ..calibration.data import calibration_batch
from ..calibration.engine import BlockStep, BlockwiseEngine, hooks
from ..calibration.offload import onloaded
from ..configuration import StrictConfig
from ..errors import PruningCheckError, RecipeError
from ..report import ModuleReport, StepReport
from ..utils import logger
from .masks import Structure, expected_pruned, nm_violations, parse_structure


# ----------------------------------------------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PruneContext:
    """Everything a method may use: the model, tokenizer, adapter and (lazily built) calibration windows."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    calibration: CalibrationConfig
    processor: Any = None
    block_context: Any = onloaded  # how a block is materialized while worked on (offload hooks, streaming)
    _windows: torch.Tensor | None = None
    _image_batches: list[dict] | None = None
    calibration_info: dict[str, Any] | None = None

    def uses_images(self) -> bool:
        from ..vlm.data import is_image_source

        return self.processor is not None and self.adapter.is_vlm and is_image_source(self.calibration.source)

    def seqlen(self) -> int:
        if self.calibration.seqlen:
            return self.calibration.seqlen
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        seqlen = min(DEFAULT_SEQLEN, max_pos) if max_pos else DEFAULT_SEQLEN
        logger.info("calibration.seqlen not set: using %d", seqlen)
        return seqlen

    def calibration_ids(self) -> torch.Tensor:
        if self._windows is None:
            if self.tokenizer is None:
                raise RecipeError("Calibration needs a tokenizer: pass one to HFPruner(model, tokenizer, ...).")
            seqlen = self.seqlen()
            max_pos = getattr(self.model.config, "max_position_embeddings", None)
            if max_pos and seqlen > max_pos:
                raise RecipeError(
                    f"calibration.seqlen={seqlen} exceeds the model's max_position_embeddings={max_pos}; "
                    f"set calibration.seqlen <= {max_pos}."
                )
            c = self.calibration
            self._windows, self.calibration_info = calibration_batch(
                c.source, self.tokenizer, c.nsamples, seqlen, c.seed, **c.source_kwargs()
            )
        return self._windows

    def engine(self) -> BlockwiseEngine:
        options = self.calibration.engine_options()
        options["block_context"] = self.block_context
        if self.uses_images():
            return BlockwiseEngine(self.model, self.adapter, self.image_batches(), **options)
        return BlockwiseEngine.from_input_ids(
            self.model, self.adapter, self.calibration_ids(), batch_size=self.calibration.batch_size or None, **options
        )

    def image_batches(self) -> list[dict]:
        """Image + text calibration samples for a VLM, one per chunk (through the processor)."""
        if self._image_batches is None:
            from ..vlm.data import image_text_batches

            c = self.calibration
            self._image_batches, self.calibration_info = image_text_batches(
                c.source,
                self.processor,
                self.adapter.vlm.image_prompt,
                c.nsamples,
                c.seqlen,
                c.seed,
                image_field=c.image_field,
                **c.source_kwargs(),
            )
        return self._image_batches

    def for_component(self, component: str) -> PruneContext:
        """The same context (and calibration data) looking at another part of a VLM (``language`` or ``vision``)."""
        if self.uses_images():
            self.image_batches()
        return dataclasses.replace(self, adapter=ModelAdapter(self.model, component=component))


# ----------------------------------------------------------------------------------------------------------------
# Method base
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StepConfig(StrictConfig):
    """Base of every step config: the registered method name."""

    method: str = ""


class PruningMethod(ABC):
    """One step of a recipe. Subclasses are registered with ``register_method``."""

    needs_calibration: bool = True

    def __init__(self, config: StepConfig):
        self.config = config

    def preflight(self, ctx: PruneContext) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Check the request against the model before any work starts (raise RecipeError)."""

    @abstractmethod
    def run(self, ctx: PruneContext) -> StepReport: ...

    def pruning_config(self) -> dict[str, Any]:
        """What goes into config.json's ``pruning_config`` for this step."""
        return self.config.to_dict()


# ----------------------------------------------------------------------------------------------------------------
# Weight pruning (unstructured / N:M)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class WeightPruningConfig(StepConfig):
    """Shared keys of the weight-pruning methods.

    Args:
        sparsity: fraction of weights to remove in each target linear, in [0, 1). Implied by an N:M structure.
        structure: ``unstructured`` or ``N:M`` (N weights kept in every M consecutive inputs, e.g. ``2:4``).
        targets: roles (q, k, v, qkv, o, gate, up, gate_up, down) or regexes on module names; default all linears
            of the decoder blocks. Embeddings and lm_head are never targets.
        ignore: roles or regexes to leave dense.
        true_sequential: score each linear on the inputs of the already pruned part of its block (one forward per
            block when the calibration batch fits in memory); False scores every linear on the dense block's inputs.
        sparsity_profile: ``uniform`` (every block at ``sparsity``) or ``owl``: outlier-weighted layerwise sparsity
            (Yin et al., 2024), blocks with more activation outliers kept denser, averaging to ``sparsity``.
        owl_m: OWL's outlier threshold, a multiple of the block's mean |W| * ||X|| score.
        owl_lambda: OWL's lambda: block sparsities span at most 2 * lambda, each within ``sparsity`` +- 2 * lambda
            (+- lambda when the outlier ratios spread evenly), and average exactly to ``sparsity``.
        component: for vision-language models: ``language`` (default), ``vision`` (the vision tower) or ``all``.
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

    def validate(self) -> None:
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


def _matches(ref: LinearRef, patterns: list[str]) -> bool:
    for p in patterns:
        if p in LINEAR_ROLES or p == ref.role:
            if p == ref.role:
                return True
        elif re.search(p, ref.name):
            return True
    return False


def select_targets(adapter: ModelAdapter, targets: list[str] | None, ignore: list[str]) -> list[LinearRef]:
    refs = adapter.all_linears()
    chosen = [r for r in refs if (targets is None or _matches(r, targets)) and not _matches(r, ignore)]
    if not chosen:
        raise RecipeError(
            f"No linear matches targets={targets} ignore={ignore}. Roles in this model: "
            f"{sorted({r.role for r in refs})}; names look like {refs[0].name if refs else '?'}."
        )
    return chosen


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

    # ---- the method's math ------------------------------------------------------------------------------
    def make_stats(self, ref: LinearRef):
        """A running-statistics object with ``update(x)`` for this linear's inputs, or None if not needed."""
        return None

    @abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, stats, sparsity: float, structure: Structure, name: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Given the (out, in) float32 weight and statistics of the linear ``name``, return
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
        refs = select_targets(ctx.adapter, self.config.targets, self.config.ignore)
        if structure.is_nm:
            bad = [r for r in refs if in_features(r.module) % structure.m]
            if bad:
                raise RecipeError(
                    f"N:M structure {structure} needs every target's input width divisible by {structure.m}; "
                    f"{bad[0].name} has {in_features(bad[0].module)} inputs. Use another M, or ignore: "
                    f"['{bad[0].role}']."
                )

    def block_sparsities(
        self, ctx: PruneContext, refs_by_block: dict[int, list[LinearRef]], report: StepReport
    ) -> dict[int, float]:
        """Sparsity per block: uniform, or OWL's outlier-weighted profile (one extra dense pass to measure it)."""
        if self.config.sparsity_profile != "owl":
            return {i: self.config.sparsity for i in refs_by_block}
        from .owl import measure_outlier_ratios, owl_sparsities

        ratios = measure_outlier_ratios(ctx.engine(), refs_by_block, self.config.owl_m)
        blocks = sorted(ratios)
        values = owl_sparsities([ratios[i] for i in blocks], self.config.sparsity, self.config.owl_lambda)
        report.details["owl_outlier_ratio"] = {i: round(ratios[i], 6) for i in blocks}
        return dict(zip(blocks, values))

    def run(self, ctx: PruneContext) -> StepReport:
        start = time.perf_counter()
        report = StepReport(self.config.method, self.config.to_dict(), self.config.non_default_dict())
        for part in self.components(ctx):
            self._run_one(part, report)
            ctx.calibration_info = ctx.calibration_info or part.calibration_info
        report.time_s = time.perf_counter() - start
        return report

    def _run_one(self, ctx: PruneContext, report: StepReport) -> None:
        refs = select_targets(ctx.adapter, self.config.targets, self.config.ignore)
        by_block: dict[int, list[LinearRef]] = {}
        for ref in refs:
            by_block.setdefault(ref.block, []).append(ref)
        sparsities = self.block_sparsities(ctx, by_block, report)
        if sparsities and len(set(sparsities.values())) > 1:
            report.details["block_sparsity"] = {int(k): round(v, 6) for k, v in sparsities.items()}

        if not self.needs_calibration:
            for i, block_refs in by_block.items():
                with ctx.block_context(ctx.adapter.blocks[i]):
                    report.modules += [self._prune_ref(r, None, sparsities[i]) for r in block_refs]
        else:
            engine = ctx.engine()
            sequential = self.config.true_sequential and engine.num_chunks == 1
            if self.config.true_sequential and not sequential:
                logger.warning(
                    "true_sequential needs the whole calibration batch in one forward; it is split in %d chunks, "
                    "so every linear of a block is scored on the dense block's inputs (two passes per block).",
                    engine.num_chunks,
                )
            report.details["order"] = "true-sequential (one pass per block)" if sequential else "parallel (two passes)"
            for step in engine.walk(desc=f"{self.config.method}"):
                block_refs = by_block.get(step.index)
                if not block_refs:
                    continue
                s = sparsities[step.index]
                if sequential:
                    step.info["outputs"] = self._one_pass(step, block_refs, s, report)
                else:
                    self._two_pass(step, block_refs, s, report)

    def _one_pass(self, step: BlockStep, refs: list[LinearRef], sparsity: float, report: StepReport):
        """Prune each linear in a forward pre-hook as its inputs arrive; the block's outputs come out pruned."""
        by_input: dict[int, _SharedStats] = {}
        done: set[str] = set()

        def make_hook(ref: LinearRef):
            def hook(module, args):
                if ref.name in done:
                    return
                shared = self._shared_for(args[0], ref, by_input)
                shared.update(args[0])
                report.modules.append(self._prune_ref(ref, shared.stats, sparsity))
                done.add(ref.name)

            return hook

        with hooks([r.module.register_forward_pre_hook(make_hook(r)) for r in refs]):
            outputs = step.forward()
        self._prune_missed(refs, done, report)
        return outputs

    def _two_pass(self, step: BlockStep, refs: list[LinearRef], sparsity: float, report: StepReport) -> None:
        """Collect statistics over every chunk of the dense block, then prune; the engine re-runs the block."""
        assigned: dict[str, _SharedStats] = {}
        by_input: dict[int, _SharedStats] = {}

        def make_hook(ref: LinearRef):
            def hook(module, args):
                shared = assigned.get(ref.name)
                if shared is None:
                    shared = assigned[ref.name] = self._shared_for(args[0], ref, by_input)
                shared.update(args[0])

            return hook

        with hooks([r.module.register_forward_pre_hook(make_hook(r)) for r in refs]):
            step.forward(keep_outputs=False)
        by_input.clear()  # from here on each statistics object is referenced by its linears only, and freed with them
        done = set()
        for ref in refs:
            shared = assigned.pop(ref.name, None)
            if shared is None:
                continue
            report.modules.append(self._prune_ref(ref, shared.stats, sparsity))
            done.add(ref.name)
        self._prune_missed(refs, done, report)

    def _shared_for(self, x: torch.Tensor, ref: LinearRef, by_input: dict[int, _SharedStats]) -> _SharedStats:
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
                "%d linear(s) received no calibration input and stay dense: %s",
                len(missed),
                ", ".join(r.name for r in missed[:5]),
            )
            report.details.setdefault("not_called", []).extend(r.name for r in missed)

    @torch.no_grad()
    def _prune_ref(self, ref: LinearRef, stats, sparsity: float) -> ModuleReport:
        structure = self.config.parsed_structure
        weight = weight_out_in(ref.module)
        new_weight, mask = self.prune_weight(weight.float().contiguous(), stats, sparsity, structure, ref.name)
        if new_weight is not None:
            weight.copy_(new_weight.to(weight.dtype).masked_fill(mask, 0))
        else:
            weight.masked_fill_(mask, 0)
        return verify_pruned(ref, weight, mask, sparsity, structure, self.comparison_group)


def verify_pruned(
    ref: LinearRef, weight: torch.Tensor, mask: torch.Tensor, sparsity: float, structure: Structure, group: str
) -> ModuleReport:
    """The checks after pruning one linear: exact pruned count, zeros where the mask says, N:M, finite values."""
    expected = expected_pruned(tuple(weight.shape), sparsity, structure, group)
    pruned = int(mask.sum())
    if pruned != expected:
        raise PruningCheckError(f"{ref.name}: the mask prunes {pruned} weights, expected exactly {expected}.")
    if bool((weight[mask] != 0).any()):
        raise PruningCheckError(f"{ref.name}: weights under the mask are not zero after pruning.")
    if not bool(torch.isfinite(weight).all()):
        raise PruningCheckError(f"{ref.name}: NaN or inf in the pruned weight; nothing will be saved.")
    if structure.is_nm and nm_violations(weight, structure.n, structure.m):
        raise PruningCheckError(f"{ref.name}: the {structure} pattern does not hold after pruning.")
    measured = float((weight == 0).sum()) / weight.numel()
    return ModuleReport(ref.name, ref.role, tuple(weight.shape), sparsity, measured, pruned)
