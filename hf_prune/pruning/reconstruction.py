"""Block reconstruction after masking: refit a block's surviving weights, masks fixed, so that the pruned block's
output matches the dense block's output on the same calibration inputs.

Inside the block-by-block walk: the dense block's outputs on the block's inputs (which come through the already
pruned blocks) are the targets; after the block's targets are masked, Adam on the mean squared error between the
pruned block's outputs and those targets updates only the surviving weights of the pruned matrices (gradients are
multiplied by the keep mask and the weights re-masked after every step, so zeros, counts and N:M patterns are exactly
as the pruning left them). The error over all calibration inputs is measured before and after; the refit is kept
only when it lowered the error.

Related: Wanda++ (Yang et al., 2025: regional optimization per decoder block), block-wise reconstruction in
BRECQ (Li et al., 2021) and OmniQuant-style block losses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import WeightRef
from ..calibration.engine import BlockCall, BlockStep
from ..configuration import StrictConfig
from ..errors import RecipeError
from ..utils import map_tensors

SOLVERS = ("adam",)


@dataclass
class ReconstructConfig(StrictConfig):
    """Settings of block reconstruction (``reconstruct: true`` takes these defaults).

    Args:
        solver: ``adam``: Adam on the block's mean squared output error with masked gradients.
        epochs: passes over the calibration samples per block (1: measured on SmolLM2-135M, Wanda 2:4 perplexity
            161.0 -> 74.7 with 1 epoch, 71.8 with 2 at twice the time; lr 3e-3 and 3e-2 were worse than 1e-2).
        lr: Adam's learning rate, relative to the RMS of each weight matrix's surviving entries (the step a weight
            of typical size takes; 1e-2 moves a weight by about 1% of that size per step).
        batch_size: calibration samples (rows of the calibration batch) per Adam step.
        seed: order of the samples (the refit is deterministic for a seed on a given device).
    """

    solver: str = "adam"
    epochs: int = 1
    lr: float = 1e-2
    batch_size: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise RecipeError(f"reconstruct.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}.")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"reconstruct.{key} must be a positive integer, got {value!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise RecipeError(f"reconstruct.lr must be a number in (0, 1), got {self.lr!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"reconstruct.seed must be an integer, got {self.seed!r}.")


def parse_reconstruct(value) -> ReconstructConfig | None:
    """``reconstruct`` as a step key: false/None (off), true (defaults) or a mapping of ReconstructConfig keys."""
    if value is None or value is False:
        return None
    if value is True:
        return ReconstructConfig()
    if isinstance(value, ReconstructConfig):
        return value
    if isinstance(value, dict):
        return ReconstructConfig.from_dict(value, where="reconstruct")
    raise RecipeError(f"reconstruct must be true, false or a mapping of settings, got {value!r}.")


# ---- pure helpers -------------------------------------------------------------------------------------------------
def slice_rows(value, rows: slice, batch: int):
    """``value`` restricted to the calibration rows ``rows``: every tensor of two or more dimensions whose first
    dimension is the chunk's batch size is sliced; the rest (rotary tables shared by the batch, cache positions,
    flags) pass through."""
    return map_tensors(value, lambda t: t[rows] if t.dim() >= 2 and t.shape[0] == batch and batch > 1 else t)


def cast_floats(value, dtype: torch.dtype):
    """Floating tensors inside ``value`` cast to ``dtype`` (masks of booleans/integers unchanged)."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)


@dataclass
class Sample:
    """Some rows of one calibration chunk: the block's input hidden states, the call, and the dense target."""

    hidden: torch.Tensor
    call: BlockCall
    target: torch.Tensor

    def error(self, block) -> torch.Tensor:
        """Sum of squared differences between the block's (or a callable's) output and the target."""
        out = self.call.invoke(block, self.hidden)
        return (out.float() - self.target.float()).pow(2).sum()


def make_samples(step: BlockStep, targets: list[torch.Tensor], batch_size: int, dtype: torch.dtype) -> list[Sample]:
    """Every chunk cut into row groups of at most ``batch_size`` samples, in ``dtype``."""
    samples = []
    for hidden, call, target in zip(step.inputs, step.calls, targets):
        batch = hidden.shape[0]
        for start in range(0, batch, batch_size):
            rows = slice(start, min(start + batch_size, batch))
            sliced = BlockCall(
                cast_floats(slice_rows(call.args, rows, batch), dtype),
                cast_floats(slice_rows(call.kwargs, rows, batch), dtype),
                call.hidden_key,
            )
            samples.append(Sample(hidden[rows].to(dtype), sliced, target[rows]))
    return samples


class MaskedWeights:
    """The parameters holding a block's pruned matrices, with the entries the refit may change: surviving (nonzero)
    entries of the target matrices only. A fused experts parameter whose other matrices are not targets keeps
    those fixed.

    The refit trains float32 master copies (the parameters themselves when they are float32): a bf16/fp16 block
    keeps computing in its own dtype (the attention kernels see the dtype they support), the masters are cast to it
    in every forward, and ``commit`` rounds them into the parameters at the end."""

    def __init__(self, refs: list[WeightRef]):
        params: dict[int, nn.Parameter] = {}
        masks: dict[int, torch.Tensor] = {}
        for ref in refs:
            param = ref.parameter()
            key = id(param)
            if key not in params:
                params[key] = param
                masks[key] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            ref.view_of(masks[key])[...] = True
        self.params = list(params.values())
        self.free = [masks[id(p)] & (p.data != 0) for p in self.params]  # targets' surviving entries
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        # the values as masked, before any refit: the parameters themselves when separate masters are trained
        # (they stay untouched until ``commit``), else a copy
        self.pruned = [p.data if m is not p else p.data.clone() for p, m in zip(self.params, self.masters)]

    @property
    def separate_masters(self) -> bool:
        return any(m is not p for m, p in zip(self.masters, self.params))

    def restore(self) -> None:
        """Every entry back to its value as masked (a refit that did not help)."""
        for p, m, s in zip(self.params, self.masters, self.pruned):
            if m is p:
                p.data.copy_(s)

    def commit(self) -> None:
        """The trained masters into the parameters (rounded to their dtype; zeros stay exact zeros)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.data.copy_(m.detach().to(p.dtype))

    def scales(self) -> list[float]:
        """RMS of each parameter's free entries (Adam's step is set relative to it)."""
        return [
            float(v.data[m].float().pow(2).mean().sqrt()) if m.any() else 0.0 for v, m in zip(self.masters, self.free)
        ]

    def mask_gradients(self) -> None:
        for v, m in zip(self.masters, self.free):
            if v.grad is not None:
                v.grad.mul_(m)

    def reapply(self) -> None:
        """Entries outside the free set back to their pruned values (exact zeros stay zeros)."""
        for v, m, s in zip(self.masters, self.free, self.pruned):
            v.data.copy_(torch.where(m, v.data, s.to(v.dtype)))

    def trainable(self) -> list[torch.Tensor]:
        for v in self.masters:
            v.requires_grad_(True)
        return self.masters

    def forward_with_masters(self, block: nn.Module):
        """``block`` as a callable that computes with the masters cast to the parameters' dtypes."""
        if not self.separate_masters:
            return block
        names = {id(p): n for n, p in block.named_parameters()}
        pairs = [(names[id(p)], p.dtype, m) for p, m in zip(self.params, self.masters)]

        def call(*args, **kwargs):
            overrides = {name: m.to(dtype) for name, dtype, m in pairs}
            return torch.func.functional_call(block, overrides, args, kwargs)

        return call


@contextmanager
def trainable_only(block: nn.Module) -> Iterator[None]:
    """No parameter of ``block`` needs a gradient during the refit (the masters do); flags and gradients back
    afterwards."""
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in block.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])


def output_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error of a block's outputs against the dense targets, over every calibration value."""
    total = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets))
    return total / max(sum(t.numel() for t in targets), 1)


def refit_block(
    block: nn.Module, weights: MaskedWeights, samples: list[Sample], config: ReconstructConfig, commit: bool = True
) -> int:
    """Adam on the block's output error, masks fixed; returns the number of steps taken. ``commit``: round the
    trained masters into the parameters at the end (else the caller decides, after measuring the refit)."""
    scales = weights.scales()
    trainable = weights.trainable()
    groups = [{"params": [v], "lr": config.lr * max(s, 1e-8)} for v, s in zip(trainable, scales)]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-12)
    generator = torch.Generator().manual_seed(config.seed)
    forward = weights.forward_with_masters(block)
    steps = 0
    for _ in range(config.epochs):
        for j in torch.randperm(len(samples), generator=generator).tolist():
            sample = samples[j]
            optimizer.zero_grad(set_to_none=True)
            # the plain sum (Adam ignores the loss scale): a mean's gradient, ~1e-9 per output element, would
            # underflow in a float16 block's backward
            loss = sample.error(forward)
            loss.backward()
            weights.mask_gradients()
            optimizer.step()
            weights.reapply()
            steps += 1
    for v in trainable:
        v.grad = None
    if commit:
        weights.commit()
    return steps


def reconstruct_block(
    step: BlockStep,
    refs: list[WeightRef],
    targets: list[torch.Tensor],
    config: ReconstructConfig,
    pruned_outputs: list[torch.Tensor] | None = None,
) -> tuple[dict, list[torch.Tensor]]:
    """Refit the pruned block ``step.block`` towards ``targets`` (the dense block's outputs on ``step.inputs``);
    keep the refit only if it lowers the calibration error. ``pruned_outputs``: the masked block's outputs if
    already computed. Returns the block's report entry and its outputs (the next block's inputs)."""
    started = time.perf_counter()
    if pruned_outputs is None:
        pruned_outputs = step.forward()
    before = output_error(pruned_outputs, targets)
    weights = MaskedWeights(refs)
    samples = make_samples(step, targets, config.batch_size, step.engine.compute_dtype or step.inputs[0].dtype)
    with trainable_only(step.block), torch.enable_grad():
        steps = refit_block(step.block, weights, samples, config, commit=False)
    del samples
    finite = all(bool(torch.isfinite(v.data).all()) for v in weights.masters)
    outputs = step.forward(block=weights.forward_with_masters(step.block)) if finite else None
    after = output_error(outputs, targets) if finite else float("inf")
    kept = after < before
    if kept:
        weights.commit()
    else:
        weights.restore()
        outputs = pruned_outputs
    entry = {
        "error_before": before,
        "error_after": after if kept else before,
        "error_refit": after,
        "kept": kept,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return entry, outputs
