"""The run context every pruning step gets: the model, its tokenizer and adapter, and the calibration data."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..adapters import ModelAdapter
from ..calibration.config import DEFAULT_SEQLEN, CalibrationConfig
from ..calibration.data import calibration_batch
from ..calibration.engine import BlockwiseEngine
from ..calibration.offload import onloaded
from ..errors import RecipeError
from ..utils import logger


@dataclass
class PruneContext:
    """Everything a method may use: the model, tokenizer, adapter and (lazily built) calibration windows."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    calibration: CalibrationConfig
    processor: Any = None
    block_context: Any = onloaded  # how a block is materialized while worked on (offload hooks, streaming)
    placement: Any = None  # hf_prune.placement.Placement: where blocks run and in which dtype
    capture_context: Any = nullcontext  # what the calibration capture needs outside the blocks (streaming: embeddings)
    restructure: Any = None  # streaming: config updates -> the skeleton of the model a structural step leaves
    work: Any = None  # (hf_prune.resume.WorkFolder, step index) of a resumable prune, or None
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
        """The block-by-block engine over the calibration data (this rank's share of it in a data-parallel run)."""
        options = self.calibration.engine_options()
        options["block_context"] = self.block_context
        options["placement"] = self.placement
        options["capture_context"] = self.capture_context
        if self.uses_images():
            batches = self.image_batches()
            return BlockwiseEngine(self.model, self.adapter, batches[distributed.shard(len(batches))], **options)
        return BlockwiseEngine.from_input_ids(
            self.model, self.adapter, self.rank_ids(), batch_size=self.calibration.batch_size or None, **options
        )

    def rank_ids(self) -> torch.Tensor:
        """This rank's share of the calibration windows (all of them in a single process)."""
        ids = self.calibration_ids()
        if distributed.world_size() > ids.shape[0]:
            raise RecipeError(
                f"calibration.nsamples={ids.shape[0]} is smaller than the {distributed.world_size()} processes: every "
                "rank needs at least one window. Raise nsamples or launch fewer processes."
            )
        return ids[distributed.shard(ids.shape[0])]

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
