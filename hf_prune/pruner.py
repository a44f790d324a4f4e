"""HFPruner: the one public entry point (from_pretrained / prune / save_pretrained / perplexity)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, placement
from .adapters import ModelAdapter
from .assets import is_packaged, resolve_packaged_model
from .checkpoint import assert_finite_parameters, atomic_write_folder, check_model_source, check_output_dir
from .errors import PruningCheckError, RecipeError
from .eval.perplexity import PERPLEXITY_CONVENTION, perplexity
from .pruning.base import PruningMethod
from .pruning.context import PruneContext
from .recipe import EvalConfig, Recipe
from .registry import get_method
from .report import PruningReport, count_parameters
from .utils import logger, peak_cuda_bytes, peak_rss_bytes
from .version import __version__

PRUNING_CONFIG_KEY = "pruning_config"


def resolve_model_path(model_id_or_path: str) -> str:
    """A local folder or Hub id is returned as is; ``packaged:<name>`` is converted once and cached."""
    return resolve_packaged_model(model_id_or_path) if is_packaged(model_id_or_path) else model_id_or_path


def load_model_and_tokenizer(model_id_or_path: str, *, tokenizer: Any = None, **model_kwargs) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a causal LM or a VLM (for a VLM, the tokenizer is its processor's)."""
    model, tokenizer, _ = load_pretrained(model_id_or_path, tokenizer=tokenizer, **model_kwargs)
    return model, tokenizer


def _is_vlm_config(path: str, model_kwargs: dict) -> bool:
    from transformers import PretrainedConfig

    from .adapters import VLM_FAMILIES

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, revision=model_kwargs.get("revision"))
    except Exception:  # noqa: BLE001 - from_pretrained will explain
        return False
    return config_dict.get("model_type") in VLM_FAMILIES


def load_pretrained(model_id_or_path: str, *, tokenizer: Any = None, **model_kwargs) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, processor or None): ``AutoModelForImageTextToText`` + ``AutoProcessor`` for the VLMs of
    the adapter table, ``AutoModelForCausalLM`` + ``AutoTokenizer`` otherwise. A saved visual-token setting is
    turned on."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    check_model_source(model_id_or_path)
    path = resolve_model_path(model_id_or_path)
    trust = model_kwargs.get("trust_remote_code", False)
    processor = None
    if _is_vlm_config(path, model_kwargs):
        model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
        tokenizer = tokenizer or getattr(processor, "tokenizer", None)
    else:
        model = _load_known_remote_code(path, model_kwargs) or AutoModelForCausalLM.from_pretrained(
            path, **model_kwargs
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    model.eval()
    _restore_visual_tokens(model)
    return model, tokenizer, processor


def _restore_visual_tokens(model: nn.Module) -> None:
    steps = (getattr(model.config, PRUNING_CONFIG_KEY, None) or {}).get("steps", [])
    for step in steps:
        if step.get("method") == "visual_tokens":
            from .vlm.tokens import enable_visual_token_pruning

            enable_visual_token_pruning(model, **{k: step[k] for k in ("strategy", "keep", "layer", "score", "seed")})
            logger.info(
                "Visual-token pruning re-enabled from pruning_config: %s keep=%s", step["strategy"], step["keep"]
            )


def _load_known_remote_code(path: str, model_kwargs: dict) -> nn.Module | None:
    """Checkpoints whose modeling file hf_prune wrote (sliced models) load with hf_prune's own copy of that code,
    so no code from the checkpoint runs; None for every other checkpoint."""
    from transformers import PretrainedConfig

    from .methods.slicegpt.remote import PREFIX, load_sliced

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, revision=model_kwargs.get("revision"))
    except Exception:  # noqa: BLE001 - let from_pretrained raise its own, clearer error
        return None
    if str(config_dict.get("model_type", "")).startswith(PREFIX):
        return load_sliced(path, config_dict, **model_kwargs)
    return None


# Steps after which healing distills from the dense teacher unless told otherwise.
DISTILL_BY_DEFAULT = ("width", "shrink")


RESUMABLE_STRUCTURE = ("depth", "width", "experts", "shrink")  # resumed from their last finished step


def _check_snapshot_room(folder: Path, model_bytes: int) -> None:
    """A resumable prune with a structural step before the last saves the model once in its work folder."""
    import shutil

    probe = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if free < 1.05 * model_bytes:
        raise RecipeError(
            f"resume: a structural step saves the model ({model_bytes / 2**30:.1f} GiB) in {folder} so a kill can "
            f"resume after it, but only {free / 2**30:.1f} GiB are free there; free some space, or pass another "
            "work_dir, or drop resume."
        )


def _resumable(method: PruningMethod) -> bool:
    from .pruning.weight_pruning import WeightPruningMethod

    if getattr(method.config, "component", "language") != "language":
        return False
    if isinstance(method, WeightPruningMethod):
        return True
    return method.config.method in RESUMABLE_STRUCTURE and not getattr(method.config, "per_block", False)


class HFPruner:
    """Prune a Hugging Face causal LM with a recipe, block by block.

    Args:
        model: a loaded ``transformers`` model (any device placement).
        tokenizer: its tokenizer (needed for calibration and perplexity).
        recipe: a ``Recipe``, a dict, a YAML string or the path of a YAML file.

    Example::

        pruner = HFPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", recipe="configs/wanda_2of4.yaml")
        report = pruner.prune()
        pruner.save_pretrained("out/")
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, recipe: Recipe | dict | str | None = None, processor: Any = None
    ):
        distributed.init_from_env()  # under torchrun: data-parallel calibration over the ranks
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.recipe = Recipe.load(recipe)
        self.adapter = ModelAdapter(model)
        self.report: PruningReport | None = None
        self._failed: str | None = None  # why the last prune() stopped half-way: saving is refused
        self._source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        self._applied: list[PruningMethod] = []
        self._resumed_configs: dict[int, dict | None] = {}  # steps a resume skipped: what they recorded then
        self._peft_model = None  # a healing adapter kept unmerged
        self._heal: dict[str, Any] | None = None
        self._work = None  # a resumable prune's work folder, removed once the result is saved
        self._base_model: str | None = self._source  # what the card names as base_model (Hub id or path)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | None = None,
        recipe: Recipe | dict | str | None = None,
        *,
        tokenizer: Any = None,
        **model_kwargs,
    ) -> HFPruner:
        """Load a model (local folder, Hub id, or ``packaged:<name>``) and its tokenizer.

        Args:
            model_id_or_path: the model; defaults to the recipe's ``model``.
            recipe: the recipe (object, dict, YAML string or path).
            tokenizer: a tokenizer to use instead of the model's own.
            **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
                ``trust_remote_code``, ``revision``, ...).
        """
        recipe = Recipe.load(recipe)
        model_id = model_id_or_path or recipe.model
        if not model_id:
            raise RecipeError("No model given: pass model_id_or_path or set 'model:' in the recipe.")
        if recipe.output.dir:  # refuse an output folder it could not write before loading anything
            check_output_dir(recipe.output.dir, recipe.output.overwrite, [str(model_id)])
        if distributed.init_from_env() and torch.cuda.is_available() and "device_map" not in model_kwargs:
            model_kwargs["device_map"] = {"": torch.device("cuda", torch.cuda.current_device())}  # one GPU per rank
        model, tokenizer, processor = load_pretrained(model_id, tokenizer=tokenizer, **model_kwargs)
        pruner = cls(model, tokenizer, recipe, processor=processor)
        pruner._source = resolve_model_path(model_id)
        pruner._base_model = model_id
        return pruner

    # ------------------------------------------------------------------ pruning
    def prune(self, resume: bool = False, work_dir: str | os.PathLike | None = None) -> PruningReport:
        """Run every step of the recipe (after checking all of them against the model) and return the report.

        Args:
            resume: keep a work folder (``.NAME.work`` beside the output folder, or ``work_dir``) with every finished
                block, and continue from it when it holds a killed prune of the same recipe, calibration and model
                (another one is refused). The result is bit-identical to an uninterrupted run; the folder is removed
                once the pruned model is saved. Weight-pruning steps (magnitude, Wanda, SparseGPT, OWL,
                reconstruction) resume from their last finished block; depth, uniform width, expert removal and
                shrink from their last finished step; in one process or under torchrun (the same number of ranks).
            work_dir: where that work folder lives (default: beside the recipe's ``output.dir``).
        """
        recipe = self.recipe
        if not recipe.steps:
            raise RecipeError("The recipe has no steps. Add e.g. steps: [{method: wanda, sparsity: 0.5}].")
        if recipe.heal is not None and distributed.active():
            raise RecipeError(
                "This recipe heals after pruning, which torchrun cannot do (each rank would train its own adapter). "
                "Drop heal: here and heal the saved model in one process."
            )
        if recipe.output.dir:  # before calibrating: the save at the end must not fail on its folder
            check_output_dir(recipe.output.dir, recipe.output.overwrite, [self._source])
        start = time.perf_counter()
        ctx = PruneContext(self.model, self.tokenizer, self.adapter, recipe.calibration, processor=self.processor)
        methods = [get_method(step.method).method_cls(step) for step in recipe.steps]
        place = placement.plan(
            self.model,
            self.adapter,
            recipe.device,
            onload=recipe.onload,
            nsamples=recipe.calibration.nsamples,
            seqlen=ctx.seqlen(),
            methods=methods,
        )
        if place.mode == "onloaded" or placement.offloaded(self.model):
            refused = [m.config.method for m in methods if not m.supports_offload]
            if refused:
                raise RecipeError(
                    f"{', '.join(refused)} cannot run on a model whose weights are offloaded ({place.reason}): "
                    "they edit tensors of every block at once. Give the step a device the whole model fits "
                    "(device: cpu works anywhere), or load without offloading in the device_map."
                )
        for method in methods:
            method.preflight(ctx)
        placement.apply(self.model, place)
        place.log()
        ctx.placement = place

        total, nonzero = count_parameters(self.model)
        report = PruningReport(
            model=str(self._source or type(self.model).__name__),
            family=self.adapter.family,
            num_blocks=self.adapter.num_blocks,
            params_before=total,
            nonzero_before=nonzero,
            placement=place.to_dict(),
        )
        if recipe.eval is not None and recipe.eval.dense:
            report.evaluation["perplexity_dense"] = self._eval_perplexity(recipe.eval)
        work = self._open_work_folder(ctx, methods, place, work_dir) if resume else None

        for index, method in enumerate(methods):
            logger.info("Step %d/%d: %s", len(report.steps) + 1, len(methods), method.config.method)
            finished = work.finished_step(index) if work is not None else None
            if finished is not None:  # finished before the kill: its weights were restored
                step_report, self._resumed_configs[id(method)] = finished
                report.steps.append(step_report)
                self._applied.append(method)
                continue
            ctx.work = (work, index) if work is not None else None
            try:
                step_report = method.run(ctx)
            except Exception as exc:
                self._failed = f"step {len(report.steps) + 1} ({method.config.method}) failed: {exc}"
                raise
            step_report.details["ran_on"] = place.describe()
            report.steps.append(step_report)
            self._applied.append(method)
            self.model = ctx.model  # a step may rebuild the model (slicing) or change its structure (depth)
            self.adapter = ctx.adapter = ModelAdapter(self.model)
            if work is not None:
                from .pruning.weight_pruning import WeightPruningMethod

                structural = not isinstance(method, WeightPruningMethod)
                if not (structural and index == len(methods) - 1):  # a last structural step is redone, not saved
                    snapshot = self._save_snapshot if structural else None
                    work.commit_step(index, step_report, method.pruning_config(), snapshot)
        report.calibration = ctx.calibration_info
        self._check_outputs_finite(ctx)

        report.params_after, report.nonzero_after = count_parameters(self.model)
        report.time_s = time.perf_counter() - start
        report.peak_rss_bytes = peak_rss_bytes()
        report.peak_cuda_bytes = peak_cuda_bytes()
        if recipe.eval is not None:
            report.evaluation["perplexity"] = self._eval_perplexity(recipe.eval)
            report.evaluation["perplexity_convention"] = (
                f"{recipe.eval.source}, seqlen {recipe.eval.seqlen}, first {recipe.eval.max_windows} windows; "
                + PERPLEXITY_CONVENTION
            )
        self.report = report
        self._record_pruning_config()
        return report

    def _open_work_folder(self, ctx: PruneContext, methods: list[PruningMethod], place, work_dir):
        """The resumable prune's work folder, its saved blocks loaded into the model (see ``hf_prune.resume``)."""
        from .pruning.weight_pruning import WeightPruningMethod
        from .resume import WorkFolder, fingerprint, work_folder_for

        refused = [m.config.method for m in methods if not _resumable(m)]
        if refused:
            raise RecipeError(
                f"resume: {', '.join(refused)} cannot be resumed yet (resumable prunes cover magnitude, Wanda, "
                "SparseGPT, OWL and reconstruction on the language model, and depth, uniform width, expert removal "
                "and shrink, which resume from their last finished step). Drop resume, or split the recipe."
            )
        structural = [i for i, m in enumerate(methods) if not isinstance(m, WeightPruningMethod)]
        if structural and place.mode == "in_place" and placement.is_dispatched(self.model):
            raise RecipeError(
                "resume: structural steps on a model dispatched by accelerate (a device_map over several devices, "
                "offload, cpu_offload) cannot be resumed yet (the snapshot would need the same dispatch); load it "
                "on one device, or use onload: true."
            )
        if work_dir is None and not self.recipe.output.dir:
            raise RecipeError("resume needs an output folder (the work folder lives beside it): set output.dir.")
        path = work_dir or work_folder_for(self.recipe.output.dir)
        snapshots = [i for i in structural if i < len(methods) - 1]  # the last step's result is the output itself
        if snapshots:
            _check_snapshot_room(Path(path), placement.parameter_bytes(self.model))
        windows = ctx.calibration_ids() if not ctx.uses_images() else None
        work = WorkFolder.open(path, fingerprint(self.recipe.to_dict(), windows, self.model, place.to_dict()))
        work.fixed_batch_size(ctx, self.model, place.device)
        snapshot = work.snapshot() if work.resumed else None
        if snapshot is not None:  # the model as the last finished structural step left it
            self.model = ctx.model = self._load_snapshot(snapshot, place)
            self.adapter = ctx.adapter = ModelAdapter(self.model)
            logger.info("resume: the model as step %d left it, from %s.", work.state["model_step"] + 1, snapshot)
        if work.resumed:
            restored = work.restore_blocks(self.adapter.blocks, ctx.block_context)
            logger.info("resume: %d block(s) restored as the killed prune left them.", restored)
        self._work = work
        return work

    @torch.no_grad()
    def _check_outputs_finite(self, ctx: PruneContext) -> None:
        if ctx._windows is not None:
            ids = ctx._windows[:1, : min(ctx._windows.shape[1], 256)]
        elif self.tokenizer is not None:
            ids = self.tokenizer("The pruned model must still produce finite logits.", return_tensors="pt")[
                "input_ids"
            ]
        else:
            ids = torch.arange(16).unsqueeze(0)
        from .calibration.engine import model_device

        logits = self.model(input_ids=ids.to(model_device(self.model)), use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            raise PruningCheckError("The pruned model produces NaN/inf logits; nothing is saved.")

    def _eval_perplexity(self, cfg: EvalConfig) -> float:
        return perplexity(self.model, self.tokenizer, cfg.source, cfg.seqlen, cfg.max_windows, cfg.batch_size)

    def _load_snapshot(self, folder: Path, place) -> nn.Module:
        """The snapshot in place of the model: the model's tensors are released first (never two models on the
        device or in host memory), then the snapshot is loaded with the model's dtype and attention implementation
        and put where the model was (moved, onloaded, or on its one device)."""
        import gc

        from accelerate.hooks import remove_hook_from_module

        old = self.model
        dtype = placement.model_dtype(old)
        attention = getattr(old.config, "_attn_implementation", None)
        remove_hook_from_module(old, recurse=True)
        old.to("meta")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kwargs = {"attn_implementation": attention} if attention else {}
        model = type(old).from_pretrained(str(folder), dtype=dtype, **kwargs).eval()
        if place.mode == "in_place":
            model.to(place.device)
        else:
            placement.apply(model, place)
        return model

    def _save_snapshot(self, folder: Path) -> None:
        """The model as it is now, as a plain checkpoint (a structural step's commit in a resumable prune)."""
        state = None
        if placement.offloaded(self.model):  # onloaded: the weights live in the offload's map
            from .surgery import materialized_state_dict

            state = materialized_state_dict(self.model)
        self.model.save_pretrained(str(folder), state_dict=state)

    def _record_pruning_config(self) -> None:
        steps = [self._resumed_configs.get(id(m)) or m.pruning_config() for m in self._applied]
        first = next((s for s in steps if s.get("sparsity") is not None), {})
        entry = {
            "method": "+".join(s["method"] for s in steps),
            "sparsity": first.get("sparsity"),
            "structure": first.get("structure"),
            "steps": steps,
            "calibration": self.report.calibration if self.report else None,
            "hf_prune_version": __version__,
            "base_model": str(self._base_model) if self._base_model else None,
        }
        if distributed.active():
            entry["world_size"] = distributed.world_size()
        if self._heal is not None:
            entry["heal"] = self._heal
        setattr(self.model.config, PRUNING_CONFIG_KEY, entry)

    # ------------------------------------------------------------------ healing
    def heal(self, teacher: nn.Module | str | None = None, **overrides) -> dict[str, Any]:
        """Heal the pruned model with a PEFT adapter that keeps its zeros, then merge (unless ``merge=False``).

        Args:
            teacher: the dense model for distillation (a loaded model, a folder or a Hub id); default the model the
                pruner was loaded from. Only used with ``distill=True``.
            **overrides: keys of ``HealConfig`` (``max_steps``, ``lora_r``, ``mask``, ``distill``, ...), over the
                recipe's ``heal:`` section.

        Returns:
            A summary: mask mode, steps, tokens, trainable parameters, first/last losses, time, sparsity check.
        """
        from .heal import HealConfig, heal_model

        if distributed.active():
            raise RecipeError(
                "Healing under torchrun would train a different adapter on every rank. Save the pruned model, then "
                "heal it in one process (hf-prune run with a heal: section, or HFPruner.heal)."
            )
        base = self.recipe.heal.to_dict() if self.recipe.heal is not None else {}
        cfg = HealConfig.from_dict({**base, **overrides}, "heal")
        if cfg.distill is None:  # distillation is the default after width pruning, where a teacher is known
            narrowed = any(m.config.method in DISTILL_BY_DEFAULT for m in self._applied)
            cfg.distill = narrowed and (teacher is not None or cfg.teacher is not None or self._source is not None)
            if narrowed and not cfg.distill:
                logger.warning("heal: no dense teacher known (pass heal(teacher=...)); healing without distillation.")
        teacher_model = None
        if cfg.distill:
            teacher_model = self._load_teacher(teacher if teacher is not None else cfg.teacher)
        self.model, result, self._peft_model = heal_model(self.model, self.tokenizer, self.adapter, cfg, teacher_model)
        del teacher_model
        self.adapter = ModelAdapter(self.model)
        summary = result.to_dict()
        if self.recipe.eval is not None and cfg.merge:
            summary["perplexity_after_heal"] = self._eval_perplexity(self.recipe.eval)
        self._heal = summary
        if self.report is not None:
            self.report.evaluation.update({f"heal_{k}": v for k, v in summary.items() if "perplexity" in k})
            self.report.notes.append(f"healed: {summary}")
        self._record_pruning_config()
        return summary

    def _load_teacher(self, teacher: nn.Module | str | None) -> nn.Module:
        if isinstance(teacher, nn.Module):
            return teacher.eval()
        source = teacher or self._source
        if not source:
            raise RecipeError(
                "Distillation needs the dense teacher: pass heal(teacher=<model, folder or Hub id>) or set "
                "heal.teacher."
            )
        model, _ = load_model_and_tokenizer(source, tokenizer=self.tokenizer)
        return model

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, tasks: list[str] | tuple[str, ...] | None = None, limit: int | float | None = None, **kwargs
    ) -> dict[str, dict[str, float]]:
        """Run lm-evaluation-harness on the in-memory model; results go into the report (and the model card).

        Args:
            tasks: lm-eval task names; default the shipped offline tasks (``wikipedia_lead_ppl``,
                ``wikipedia_lead_mc``).
            limit: examples per task.
            **kwargs: ``num_fewshot``, ``batch_size``, ``device`` for ``lm_eval.simple_evaluate`` / ``HFLM``.
        """
        from .eval.harness import SHIPPED_TASKS, run_lm_eval

        results = run_lm_eval(self.model, self.tokenizer, tasks or SHIPPED_TASKS, limit=limit, **kwargs)
        if self.report is None:
            total, nonzero = count_parameters(self.model)
            self.report = PruningReport(
                str(self._source or type(self.model).__name__),
                self.adapter.family,
                self.adapter.num_blocks,
                params_before=total,
                nonzero_before=nonzero,
                params_after=total,
                nonzero_after=nonzero,
            )
        self.report.evaluation.setdefault("lm_eval", {}).update(results)
        return results

    def perplexity(self, source: Any = "wikipedia", seqlen: int = 512, max_windows: int | None = 32, **kw) -> float:
        """Perplexity of the current model (see ``hf_prune.eval.PERPLEXITY_CONVENTION``)."""
        return perplexity(self.model, self.tokenizer, source, seqlen, max_windows, **kw)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
        """Save a normal HF checkpoint (+ tokenizer, + ``pruning_report.json``) that reloads with
        ``AutoModelForCausalLM.from_pretrained``. The folder appears complete or not at all.

        Args:
            save_directory: the output folder (new or empty, unless ``overwrite``).
            overwrite: replace a non-empty folder (never the folder the model was loaded from).
            **kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).
        """
        if self._failed:
            raise PruningCheckError(
                f"Nothing saved: the last prune() stopped half-way ({self._failed}); the model in memory is partly "
                "pruned. Load it again and prune with a corrected recipe."
            )
        check_output_dir(save_directory, overwrite, [self._source])
        assert_finite_parameters(self.model)
        distributed.barrier()  # every rank finished pruning (a failed rank fails this collective: nothing written)
        if not distributed.is_main():  # one writer; the others wait for the folder to be complete
            distributed.barrier()
            return Path(save_directory).absolute()

        def write(tmp: Path) -> None:
            if self._peft_model is not None:  # unmerged healing adapter: the base and, beside it, the adapter
                from .heal.persist import base_state_dict, save_adapter

                self.model.save_pretrained(str(tmp), state_dict=base_state_dict(self.model), **kwargs)
                save_adapter(
                    self._peft_model, tmp, self._heal["mask"], self.recipe.heal.seed if self.recipe.heal else 0
                )
            elif placement.offloaded(self.model) and not getattr(self.model, "hf_device_map", None):
                # onloaded / cpu_offload: transformers reads a device_map's offloaded weights shard by shard itself
                from .surgery import materialized_state_dict

                self.model.save_pretrained(str(tmp), state_dict=materialized_state_dict(self.model), **kwargs)
            else:
                self.model.save_pretrained(str(tmp), **kwargs)
            if self.processor is not None:
                self.processor.save_pretrained(str(tmp))
            elif self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            if self.report is not None:
                self.report.to_json(str(tmp / "pruning_report.json"))

        out = atomic_write_folder(save_directory, write, overwrite)
        logger.info("Saved the pruned model to %s", out)
        if self._work is not None:  # a resumable prune's work is in the saved model now
            self._work.remove()
            self._work = None
        distributed.barrier()
        return out

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Upload the pruned checkpoint, tokenizer, report and a model card to the Hub; return the commit URL.

        Args:
            repo_id: ``user/name`` (created if missing).
            private: create the repo private.
            token: a write token (default: the logged-in one / HF_TOKEN).
            revision: a branch to push to (created from main if missing).
            commit_message: the commit title.
            endpoint: another Hub endpoint (default HF_ENDPOINT or huggingface.co).
        """
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory(prefix="hf_prune_push_") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            if not distributed.is_main():  # rank 0 wrote the folder and pushes it
                return ""
            return push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                endpoint=endpoint,
            )
