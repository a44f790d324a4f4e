"""Resumable prunes: a work folder beside the output (``.NAME.work/``) that a killed prune continues from.

After every block of a weight-pruning step the engine commits, in this order: the block as pruned
(``s{step}-b{block}.safetensors``), the next block's inputs (``inputs-b{block + 1}/``), then ``state.json`` (the
position, the step's report so far, what the step decided up front such as OWL's sparsities). Each file is written
to a temporary name and renamed, and ``state.json`` last, so whatever a kill leaves is either the previous commit or
the new one. A resume checks the fingerprint (recipe, calibration windows, model), loads every block as last
committed, skips the finished steps and walks the current one from the next block with the saved inputs: the result
is bit-identical to an uninterrupted run (tested). A structural step (depth, width, expert removal, shrink) resumes
at step granularity: when it finishes, the model as it left it is saved in the folder (``model-s{step}/``, a plain
checkpoint) and a resume loads that instead of the original model; a kill inside a structural step runs that step
again from its start. The folder is removed when the prune succeeds.

Under torchrun every rank holds the same model and its own share of the calibration windows: rank 0 writes the
block files, the snapshots and ``state.json``; every rank writes its own next-block inputs (``inputs-b{n}/rank{r}/``),
and a commit's state is written only once every rank's inputs are in place (barriers). A resume needs the same number
of ranks (it is in the fingerprint) and reads the same folder from every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .errors import RecipeError
from .report import StepReport
from .utils import logger

STATE = "state.json"


def work_folder_for(output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir).expanduser().absolute()
    return out.parent / f".{out.name}.work"


def fingerprint(recipe: dict, windows: torch.Tensor | None, model: nn.Module, placement: dict | None) -> str:
    """What a resumed run must share with the killed one: the recipe's steps and calibration, the calibration
    windows, the model (config, parameter count, a digest of its embeddings), where it ran and over how many ranks
    (each rank's next-block inputs are its own share of the windows)."""
    digest = hashlib.sha256()
    digest.update(f"ranks={distributed.world_size()}".encode())
    settings = {k: recipe.get(k) for k in ("model", "calibration", "steps")}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if windows is not None:
        digest.update(windows.cpu().numpy().tobytes())
    config = model.config.to_dict()
    config.pop("pruning_config", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(sum(p.numel() for p in model.parameters())).encode())
    emb = model.get_input_embeddings().weight
    if emb.device.type != "meta":
        digest.update(emb.detach()[:64].float().cpu().numpy().tobytes())
    if placement:
        where = {k: placement[k] for k in ("storage_dtype", "compute_dtype")}
        where["device"] = torch.device(placement["device"]).type  # the kind, not the index (each rank its own GPU)
        digest.update(json.dumps(where).encode())
    return digest.hexdigest()


class WorkFolder:
    """The state of one resumable prune (see the module docstring)."""

    def __init__(self, path: Path, fingerprint_: str):
        self.path = path
        self.fingerprint = fingerprint_
        self.state: dict[str, Any] = {"fingerprint": fingerprint_, "step": 0, "next_block": 0, "steps": [], "plan": {}}

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint_: str) -> WorkFolder:
        """The work folder at ``path``: continued if it holds a prune with the same fingerprint, refused if it holds
        another one, created otherwise."""
        folder = cls(Path(path), fingerprint_)
        state_file = folder.path / STATE
        existed = state_file.exists()
        state = json.loads(state_file.read_text()) if existed else None
        foreign = not existed and folder.path.exists() and any(folder.path.iterdir())
        # every rank looks before rank 0 creates anything, and all reach the same verdict (a rank that raised alone
        # would leave the others waiting in the next collective)
        looks = distributed.all_gather_objects((fingerprint_, existed, foreign))
        if len({look[0] for look in looks}) > 1:
            raise RecipeError(
                "resume: the ranks describe different prunes (their recipe, calibration windows or model differ); "
                "launch every rank with the same arguments."
            )
        if len({look[1] for look in looks}) > 1:
            raise RecipeError(
                f"resume: {folder.path} does not look the same from every rank; the work folder must be on a "
                "filesystem all ranks share (set output.dir, or work_dir, there)."
            )
        if existed:
            if state.get("fingerprint") != fingerprint_:
                raise RecipeError(
                    f"{folder.path} holds a prune with other settings (recipe, calibration or model differ), so it "
                    "cannot be resumed with these. Run with the same recipe, or delete that folder to start over."
                )
            folder.state = state
            logger.info(
                "Resuming from %s: step %d, block %d (%d step(s) finished).",
                folder.path,
                state["step"] + 1,
                state["next_block"],
                len(state["steps"]),
            )
        else:
            if any(look[2] for look in looks):  # never adopt (and later delete) a user's folder
                raise RecipeError(
                    f"{folder.path} is not empty and holds no hf_prune work state; choose another work folder."
                )
            if distributed.is_main():
                folder.path.mkdir(parents=True, exist_ok=True)
                folder._write_state()
            distributed.barrier()  # rank 0 has written the state before the others look for it
            if not all(distributed.all_gather_objects(state_file.exists())):
                raise RecipeError(
                    f"resume: {folder.path}, created by rank 0, is not visible from every rank; the work folder "
                    "must be on a filesystem all ranks share (set output.dir, or work_dir, there)."
                )
        return folder

    # ------------------------------------------------------------------ reading
    @property
    def resumed(self) -> bool:
        return self.state["step"] > 0 or self.state["next_block"] > 0

    def finished_step(self, index: int) -> tuple[StepReport, dict | None] | None:
        """Step ``index``'s report and the ``pruning_config`` it recorded, if it finished before the kill."""
        if index >= len(self.state["steps"]):
            return None
        saved = dict(self.state["steps"][index])
        config = saved.pop("pruning_config", None)
        return StepReport.from_dict(saved), config

    def start(self, step: int) -> int:
        """The first block step ``step`` still has to prune."""
        return self.state["next_block"] if step == self.state["step"] else 0

    def partial_report(self, step: int) -> dict | None:
        return self.state.get("partial") if step == self.state["step"] else None

    def inputs(self, block: int) -> list[torch.Tensor]:
        """This rank's calibration inputs of block ``block``, as the killed run committed them."""
        folder = self.path / f"inputs-b{block}" / f"rank{distributed.rank()}"
        n = len(list(folder.glob("*.pt")))
        return [torch.load(folder / f"{j}.pt", weights_only=True) for j in range(n)]

    def plan(self, step: int, key: str, compute, agree=None):
        """A value step ``step`` decides before its walk (e.g. OWL's sparsities): computed once, then kept. Under
        torchrun every rank keeps the same value: ``agree(values of every rank)`` (default: rank 0's)."""
        plans = self.state["plan"].setdefault(str(step), {})
        if key not in plans:
            values = distributed.all_gather_objects(compute())
            plans[key] = agree(values) if agree is not None else values[0]
            self._write_state()
        return plans[key]

    def snapshot(self) -> Path | None:
        """The model as the last finished structural step left it (a saved checkpoint), if one did."""
        step = self.state.get("model_step")
        return self.path / f"model-s{step}" if step is not None else None

    def restore_blocks(self, blocks: nn.ModuleList, block_context) -> int:
        """Every block as last committed (the latest step that finished it); returns how many were restored."""
        restored = 0
        for b, block in enumerate(blocks):
            path = self._latest_block_file(b)
            if path is None:
                continue
            with block_context(block):
                state = load_file(str(path))
                device = next((p.device for p in block.parameters() if p.device.type != "meta"), None)
                block.load_state_dict({k: v.to(device) if device else v for k, v in state.items()})
            restored += 1
        return restored

    def block_file(self, block: int) -> Path | None:
        """Where block ``block`` was last committed (block-local keys, the model's layout), if it was."""
        return self._latest_block_file(block)

    def fixed_batch_size(self, ctx, model: nn.Module, device) -> None:
        """The killed run's calibration chunks, not today's free memory: the auto batch size is decided once and
        kept in the work folder, so the resumed walk splits the windows alike (``ctx.calibration`` updated)."""
        import dataclasses

        from .calibration.engine import auto_batch_size

        if ctx.uses_images() or ctx.calibration.batch_size:
            return
        n, seqlen = ctx.rank_ids().shape[0], ctx.calibration_ids().shape[1]
        # the smallest rank's: free memory differs by rank, and every rank must split its windows alike
        size = self.plan(-1, "batch_size", lambda: auto_batch_size(model, n, seqlen, device=device), agree=min)
        ctx.calibration = dataclasses.replace(ctx.calibration, batch_size=int(size))

    def _latest_block_file(self, block: int) -> Path | None:
        current, start = self.state["step"], self.state["next_block"]
        snapshot = self.state.get("model_step")
        for step in range(current, -1 if snapshot is None else snapshot, -1):  # a snapshot holds earlier steps
            if step == current and block >= start:
                continue
            path = self.path / f"s{step}-b{block}.safetensors"
            if path.exists():
                return path
        return None

    # ------------------------------------------------------------------ writing
    def commit_block(
        self, step: int, block: int, module: nn.Module, next_inputs: list[torch.Tensor] | None, partial: dict
    ) -> None:
        """Block ``block`` of step ``step`` is done: its weights (rank 0), every rank's next-block inputs, then the
        state (rank 0, once all are written)."""
        main = distributed.is_main()
        if main:
            tmp = self.path / f".s{step}-b{block}.tmp"
            state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp))
            os.replace(tmp, self.path / f"s{step}-b{block}.safetensors")
        if next_inputs is not None:
            folder = self.path / f"inputs-b{block + 1}"
            staging = self.path / f".inputs-b{block + 1}.tmp"
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
            distributed.barrier()
            mine = staging / f"rank{distributed.rank()}"
            mine.mkdir()
            for j, x in enumerate(next_inputs):
                torch.save(x.detach().to("cpu"), mine / f"{j}.pt")
            distributed.barrier()  # every rank's inputs are staged
            if main:
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
        self.state.update(step=step, next_block=block + 1, partial=partial)
        self._write_state()
        if main:
            shutil.rmtree(self.path / f"inputs-b{block}", ignore_errors=True)
            for older in range(step):  # superseded versions of this block
                (self.path / f"s{older}-b{block}.safetensors").unlink(missing_ok=True)
        distributed.barrier()

    def commit_step(self, step: int, report: StepReport, pruning_config: dict, save_model=None) -> None:
        """Step ``step`` finished with ``report`` and records ``pruning_config``. A structural step (its shapes
        changed) passes ``save_model``, which writes the model as it is now into a folder: that snapshot, then the
        state, then the superseded files go, so a kill leaves either the previous commit or this one."""
        steps = self.state["steps"][:step] + [{**dataclasses.asdict(report), "pruning_config": pruning_config}]
        if save_model is not None:
            if distributed.is_main():  # every rank holds the same model: one writes it
                staging = self.path / f".model-s{step}.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                save_model(staging)
                shutil.rmtree(self.path / f"model-s{step}", ignore_errors=True)
                os.replace(staging, self.path / f"model-s{step}")
            self.state["model_step"] = step
        self.state.update(step=step + 1, next_block=0, steps=steps, partial=None)
        self._write_state()
        if distributed.is_main():
            self._drop_superseded(step, snapshot=save_model is not None)
        distributed.barrier()

    def _drop_superseded(self, step: int, snapshot: bool) -> None:
        for folder in self.path.glob("inputs-b*"):
            shutil.rmtree(folder, ignore_errors=True)
        if snapshot:  # every block file and older snapshot is in this snapshot now
            for old in self.path.glob("s*-b*.safetensors"):
                old.unlink(missing_ok=True)
            for old in self.path.glob("model-s*"):
                if old.name != f"model-s{step}":
                    shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self.path, ignore_errors=True)

    def _write_state(self) -> None:
        if not distributed.is_main():  # every rank keeps the same state; rank 0 writes it
            return
        tmp = self.path / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, default=str))
        os.replace(tmp, self.path / STATE)
