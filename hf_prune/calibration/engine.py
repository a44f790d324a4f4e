"""Block-by-block calibration engine.

1. Capture: run the model's own forward once per calibration chunk with every decoder block replaced by a recorder
   that passes the hidden states through. Block 0's recorder keeps its input hidden states; every block's recorder
   keeps the positional AND keyword arguments the model gives THAT block (masks, position embeddings,
   cache_position, ...: whatever this transformers version passes, per-layer ones such as Gemma 3's sliding/full
   masks included). The last recorder stops the forward, so the head never runs.
2. Walk: for each block, a visitor sees the block's inputs, may run it any number of times (with hooks), and
   returns its outputs, which become the next block's inputs. Only one block's activations live at a time.

Nothing here knows about any pruning method.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import ModelAdapter
from ..utils import available_memory_bytes, logger, map_tensors
from .offload import onloaded


class _StopForward(Exception):
    """Raised by the last block's recorder: the capture needs nothing past the last block."""


@dataclass
class BlockCall:
    """How the model called one block for one chunk: everything except the hidden states."""

    args: tuple
    kwargs: dict
    hidden_key: int | str  # 0: first positional argument; else the keyword that carried the hidden states

    def invoke(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_key == 0:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{**self.kwargs, self.hidden_key: hidden})
        return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(call: BlockCall, device: torch.device) -> BlockCall:
    move = lambda t: t.to(device)  # noqa: E731
    return BlockCall(map_tensors(call.args, move), map_tensors(call.kwargs, move), call.hidden_key)


def model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    param = next(iter(emb.parameters())) if emb is not None else next(iter(model.parameters()))
    return param.device if param.device.type != "meta" else torch.device("cpu")


def estimate_block_bytes_per_sample(model: nn.Module, seqlen: int) -> int:
    """A generous estimate of the activation memory one calibration sample needs inside one block forward."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 4096)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 32)
    itemsize = next(model.parameters()).element_size()
    per_token = (8 * hidden + 3 * inter) * itemsize
    attention = heads * seqlen * seqlen * 4  # eager attention probabilities (upper bound; SDPA needs less)
    return seqlen * per_token + attention


def auto_batch_size(
    model: nn.Module, nsamples: int, seqlen: int, fraction: float = 0.35, device: torch.device | None = None
) -> int:
    """How many calibration samples one block forward may take: all of them if they fit in ``fraction`` of the
    free memory of the execution device (default the model's), else as many as fit (at least 1). The masks do not
    depend on it (true-sequential runs per input group over the chunks)."""
    device = device or model_device(model)
    budget = available_memory_bytes(device) * fraction
    per_sample = estimate_block_bytes_per_sample(model, seqlen)
    return int(max(1, min(nsamples, budget // max(per_sample, 1))))


@dataclass
class BlockStep:
    """One block of the walk: its index, module, the inputs of every chunk, and how to call it."""

    engine: BlockwiseEngine
    index: int
    block: nn.Module
    inputs: list[torch.Tensor]
    calls: list[BlockCall]
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def forward(self, keep_outputs: bool = True, block: nn.Module | None = None) -> list[torch.Tensor] | None:
        """Run the block (or a stand-in) over every chunk; return the outputs, or None if not kept."""
        block = block if block is not None else self.block
        outputs = []
        for hidden, call in zip(self.inputs, self.calls):
            out = call.invoke(block, hidden.to(self.engine.compute_dtype))
            if keep_outputs:
                outputs.append(out.to(hidden.device))
        return outputs if keep_outputs else None

    def forward_chunk(self, j: int, block: nn.Module | None = None) -> torch.Tensor:
        """Run the block (or a stand-in) on chunk ``j`` only."""
        block = block if block is not None else self.block
        return self.calls[j].invoke(block, self.inputs[j].to(self.engine.compute_dtype))

    @property
    def num_chunks(self) -> int:
        return len(self.inputs)


class BlockwiseEngine:
    """Walks a model's decoder blocks over calibration inputs, holding one block's activations at a time.

    Args:
        model: the model (any device placement, accelerate ``device_map`` included).
        adapter: where its blocks are.
        batches: model inputs of every chunk, e.g. ``[{"input_ids": ids[0:8]}, {"input_ids": ids[8:16]}]``.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: Sequence[dict[str, torch.Tensor]],
        block_context: Callable = onloaded,
        activation_dtype: torch.dtype | None = None,
        activation_dir: str | None = None,
        placement=None,
        capture_context: Callable = nullcontext,
    ):
        self.model = model
        self.adapter = adapter
        self.batches = list(batches)
        self.block_context = block_context  # materializes a block while it is worked on (offload, streaming)
        self.activation_dtype = activation_dtype  # storage dtype of activations between blocks (None: as computed)
        self.activation_dir = activation_dir  # keep activations between blocks on disk, one file per chunk
        self.placement = placement  # hf_prune.placement.Placement: execution device, compute dtype (None: as is)
        self.capture_context = capture_context  # what the capture needs outside the blocks (streaming: embeddings)
        self.compute_dtype: torch.dtype | None = None
        # resuming: the walk starts at block ``start`` with ``resume_inputs``; ``after_block(i, block, outputs)`` is
        # called after each block (weights still materialized) so a work folder can commit it
        self.start = 0
        self.resume_inputs: list[torch.Tensor] | None = None
        self.after_block: Callable | None = None
        self._inputs: list[torch.Tensor] | None = None
        self._calls: list[list[BlockCall]] | None = None

    @classmethod
    def from_input_ids(
        cls,
        model: nn.Module,
        adapter: ModelAdapter,
        input_ids: torch.Tensor,
        batch_size: int | None = None,
        **options,
    ) -> BlockwiseEngine:
        n, seqlen = input_ids.shape
        if not batch_size:  # under torchrun the smallest rank's, so that every rank walks alike
            placement = options.get("placement")
            auto = auto_batch_size(model, n, seqlen, device=placement.device if placement else None)
            batch_size = min(distributed.all_gather_objects(auto))
        batches = [{"input_ids": input_ids[i : i + batch_size]} for i in range(0, n, batch_size)]
        if len(batches) > 1:
            logger.info("Calibration runs in %d chunks of up to %d samples.", len(batches), batch_size)
        return cls(model, adapter, batches, **options)

    @property
    def num_chunks(self) -> int:
        return len(self.batches)

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def capture(self) -> None:
        blocks = self.adapter.blocks
        n_blocks = len(blocks)
        calls: list[list[BlockCall]] = [[] for _ in range(n_blocks)]
        inputs: list[torch.Tensor] = []
        saved = [block.__dict__.get("forward") for block in blocks]

        def make_recorder(i: int) -> Callable:
            def recorder(*args, **kwargs):
                if args:
                    hidden, rest, key = args[0], tuple(args[1:]), 0
                else:
                    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                    hidden, rest = kwargs.pop(key), ()
                calls[i].append(BlockCall(rest, kwargs, key))
                if i == 0:
                    inputs.append(hidden.detach())
                if i == n_blocks - 1:
                    raise _StopForward
                return hidden

            return recorder

        try:
            for i, block in enumerate(blocks):
                block.forward = make_recorder(i)
            with self.capture_context():
                device = model_device(self.model)
                for batch in self.batches:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    try:
                        self.model(**batch, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for block, original in zip(blocks, saved):
                if original is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = original
        if len(inputs) != len(self.batches) or any(len(c) != len(self.batches) for c in calls):
            raise RuntimeError(
                "The capture pass did not reach every decoder block once per chunk; this model's forward does not "
                "call its blocks in order. Please report the architecture."
            )
        self.compute_dtype = inputs[0].dtype
        placement = self.placement
        if placement is not None and placement.upcast is not None:
            self.compute_dtype = placement.upcast  # blocks computed in float32 on a CPU without bf16/fp16 units
        if placement is not None and placement.mode == "streaming" and placement.device != inputs[0].device:
            # streamed blocks are loaded straight onto the execution device; nothing dispatches their inputs
            inputs = [x.to(placement.device) for x in inputs]
            calls = [[_to_device(c, placement.device) for c in block_calls] for block_calls in calls]
        self._inputs, self._calls = self._store(inputs, -1), calls

    def _store(self, chunks: list[torch.Tensor], index: int) -> Sequence[torch.Tensor]:
        """Activations between blocks, in the storage dtype, in memory or on disk."""
        if self.activation_dtype is not None:
            chunks = [c.to(self.activation_dtype) for c in chunks]
        if self.activation_dir is None:
            return chunks
        return DiskChunks(chunks, os.path.join(self.activation_dir, f"block{index + 1}"))

    # ------------------------------------------------------------------ walk
    def walk(self, desc: str = "blocks") -> Iterator[BlockStep]:
        """Yield one BlockStep per block. After each step, ``step.outputs`` (or, if the visitor left it unset,
        a plain forward of the block) becomes the next block's inputs."""
        if self._inputs is None:
            self.capture()
        inputs = self._inputs
        self._inputs = None  # the engine hands its only copy of the activations to the walk
        if self.start:
            device = inputs[0].device
            saved = self.resume_inputs
            if len(saved) != len(inputs) or any(a.shape != b.shape for a, b in zip(saved, inputs)):
                raise RuntimeError(
                    f"resume: the saved inputs of block {self.start} ({len(saved)} chunks) do not match this run's "
                    f"calibration chunks ({len(inputs)}); the calibration batch size differs from the killed run's."
                )
            inputs = self._store([x.to(device) for x in saved], self.start - 1)
            self.resume_inputs = None
        n = self.adapter.num_blocks
        bar = tqdm(range(self.start, n), desc=desc, leave=False, disable=not distributed.is_main())
        self.block_seconds: list[float] = []
        for i in bar:
            started = time.perf_counter()
            step = BlockStep(self, i, self.adapter.blocks[i], inputs, self._calls[i])
            # offloaded / streamed weights stay materialized meanwhile, in the compute dtype
            with self.block_context(step.block):
                with self._computing(step.block):
                    yield step
                    outputs = step.info.pop("outputs", None)
                    if outputs is None:
                        outputs = step.forward()
                if self.after_block is not None:
                    self.after_block(i, step.block, list(outputs) if i + 1 < n else None)
            previous = inputs
            inputs = self._store(list(outputs), i)
            if isinstance(previous, DiskChunks):
                previous.remove()
            del previous, outputs, step  # only the next block's inputs stay alive into the next iteration
            self.block_seconds.append(time.perf_counter() - started)
        if isinstance(inputs, DiskChunks):
            final = [inputs[j] for j in range(len(inputs))]
            inputs.remove()
            inputs = final
        self.final_hidden = inputs

    def _computing(self, block: nn.Module):
        return self.placement.computing(block) if self.placement is not None else nullcontext()

    def run(self, visit: Callable[[BlockStep], list[torch.Tensor] | None], desc: str = "blocks") -> list[torch.Tensor]:
        """Call ``visit(step)`` for every block; its return value (if not None) is the block's outputs."""
        for step in self.walk(desc):
            outputs = visit(step)
            if outputs is not None:
                step.info["outputs"] = outputs
        return self.final_hidden


class DiskChunks(Sequence):
    """Activation chunks kept in files (one per chunk) and read back one at a time."""

    def __init__(self, chunks: list[torch.Tensor], folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.paths = []
        for j, chunk in enumerate(chunks):
            path = os.path.join(folder, f"{j}.pt")
            torch.save(chunk.cpu(), path)
            self.paths.append(path)
        self.device = chunks[0].device if chunks else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return torch.load(self.paths[j]).to(self.device)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def hooks(handles: list[torch.utils.hooks.RemovableHandle]):
    """Remove the given hook handles when the with-block ends, even if it raises."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
