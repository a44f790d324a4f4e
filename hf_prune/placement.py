"""Where a prune runs: the execution device, where the weights live, and the dtype blocks compute in.

One object, decided once per prune before any calibration:

- ``device``: ``auto`` (default: the accelerator torch sees, CUDA first, then XPU; else the CPU), ``cpu``, or a
  device such as ``cuda:1`` or ``mps`` (never chosen by ``auto``: its kernels lack float64).
- mode, how the weights get to that device:
    ``in_place``  the model stays where it is (already on the device, or dispatched by the user's ``device_map``,
                  offload included: accelerate moves each block's weights to its execution device);
    ``moved``     the whole model fits the accelerator with room for one block's calibration work: moved onto it;
    ``onloaded``  it does not: its weights stay in host memory and each block is brought onto the accelerator while
                  the engine works on it, then written back (sequential onloading, through accelerate's
                  ``cpu_offload`` hooks: the same code path as a user's CPU offload);
    ``streaming`` weights read from safetensors shards one block at a time, straight onto the device.
- ``compute_dtype``: the dtype a block computes in during the walk. The model's own dtype, except on a CPU without
  native bf16/fp16 matrix units, where bf16/fp16 matmuls run 7-150x slower than float32: there each block is upcast
  to float32 while it is worked on and stored back in its dtype (the saved dtype is the loaded one).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RecipeError
from .utils import available_memory_bytes, human_bytes, logger

HALF = (torch.bfloat16, torch.float16)
# Share of the accelerator's free memory the model may take when moved whole (the rest: activations, statistics).
FIT_FRACTION = 0.9


def accelerator() -> torch.device | None:
    """The accelerator ``device: auto`` picks here (CUDA, then XPU), or None."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu", 0)
    return None  # MPS only when asked for (device: mps): its kernels lack float64, which some statistics sum in


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto``/None: the accelerator if any, else the CPU; otherwise the named device, checked to exist."""
    if spec is None or spec == "auto":
        return accelerator() or torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise RecipeError(f"device must be auto, cpu, cuda, cuda:N, xpu or mps; got {spec!r}.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"device={spec!r}, but torch sees no CUDA device here (use device: cpu or auto).")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RecipeError(f"device={spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
        return torch.device("cuda", index)
    if device.type == "xpu" and (accelerator() is None or accelerator().type != "xpu"):
        raise RecipeError(f"device={spec!r}, but torch sees no xpu device here.")
    if device.type == "mps" and not _mps_available():
        raise RecipeError(f"device={spec!r}, but torch sees no mps device here.")
    if device.type not in ("cpu", "cuda", "xpu", "mps"):
        raise RecipeError(f"device must be auto, cpu, cuda, cuda:N, xpu or mps; got {spec!r}.")
    return device


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for ``dtype`` (bf16: AVX512-BF16 / AMX-BF16, Arm BF16; fp16:
    AVX512-FP16 / AMX-FP16, Arm FP16 vector arithmetic). Read from the CPU's flags, never assumed; Apple silicon
    counts as native."""
    if dtype not in HALF:
        return True
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(flags & {"avx512_fp16", "amx_fp16", "asimdhp"})


def compute_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype blocks compute in on ``device`` for weights stored in ``dtype``."""
    if device.type == "cpu" and dtype in HALF and not cpu_has_native(dtype):
        return torch.float32
    return dtype


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_dispatched(model: nn.Module) -> bool:
    """Placed by accelerate (``device_map``, ``cpu_offload``, our own onloading): hooks move tensors per module."""
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        return True
    device_map = getattr(model, "hf_device_map", None) or {}
    return len(set(device_map.values())) > 1  # one device and no hooks: a plain model on that device


def offloaded(model: nn.Module) -> bool:
    """Some weights live off their execution device (CPU or disk offload: meta tensors between forwards)."""
    from .calibration.offload import offload_hooks

    return next(offload_hooks(model), None) is not None


def parameter_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def calibration_headroom(model: nn.Module, adapter, nsamples: int, seqlen: int, methods=()) -> int:
    """Accelerator memory one block's calibration work needs beside the weights: the activations of every window at
    a block boundary (inputs and outputs), one sample's forward inside a block, float32 copies of the largest block
    (solves, refits), a block's SparseGPT Hessians (in parallel order all at once; the widest twice: cuSOLVER's
    inverse allocates one more), and what the recipe's ``methods`` need on top (``PruningMethod.block_work_bytes``:
    reconstruction)."""
    from .calibration.engine import estimate_block_bytes_per_sample

    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 4096)
    itemsize = 4
    boundary = nsamples * seqlen * hidden * itemsize
    parameters = max((sum(p.numel() for p in b.parameters()) for b in adapter.blocks), default=0)
    widest = max((r.in_features for r in adapter.linears(0)), default=hidden) if adapter.num_blocks else hidden
    hessians = (2 * widest * widest + 3 * hidden * hidden) * 4  # two-pass order: every Hessian of a block at once
    extra = max((m.block_work_bytes(parameters, boundary) for m in methods), default=0)
    return 2 * boundary + estimate_block_bytes_per_sample(model, seqlen) + 8 * parameters + hessians + extra


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Placement:
    """Where a prune runs (see the module docstring)."""

    device: torch.device
    mode: str
    storage_dtype: torch.dtype
    compute_dtype: torch.dtype
    reason: str = ""

    @property
    def upcast(self) -> torch.dtype | None:
        """The dtype blocks are cast to while they are worked on, or None (they compute in their own dtype)."""
        return self.compute_dtype if self.compute_dtype != self.storage_dtype else None

    def describe(self) -> str:
        text = f"{self.device} ({self.mode}"
        if self.upcast is not None:
            text += f"; {dtype_name(self.storage_dtype)} weights computed in float32 per block"
        return text + ")"

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "mode": self.mode,
            "storage_dtype": dtype_name(self.storage_dtype),
            "compute_dtype": dtype_name(self.compute_dtype),
            "reason": self.reason,
        }

    def log(self) -> None:
        logger.info("Placement: %s. %s", self.describe(), self.reason)
        if self.upcast is not None:
            name = dtype_name(self.storage_dtype)
            logger.info(
                "This CPU has no native %s matrix instructions (flags checked): each block is computed in float32 "
                "while it is pruned and stored back in %s.",
                name,
                name,
            )

    @contextmanager
    def computing(self, block: nn.Module) -> Iterator[None]:
        """``block`` in the compute dtype for the duration, back in its own dtypes afterwards."""
        if self.upcast is None:
            yield
            return
        with cast_block(block, self.upcast):
            yield


@contextmanager
def cast_block(block: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Floating parameters of ``block`` cast to ``dtype`` for the duration; each back to its own dtype after (values
    changed meanwhile are rounded to it)."""
    original = {}
    for p in block.parameters():
        if p.is_floating_point() and p.device.type != "meta" and p.dtype != dtype:
            original[p] = p.dtype
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, old in original.items():
            if p.dtype != old:
                p.data = p.data.to(old)


def plan(
    model: nn.Module,
    adapter,
    device: str | torch.device | None = "auto",
    *,
    onload: bool | str = "auto",
    nsamples: int = 128,
    seqlen: int = 2048,
    methods=(),
) -> Placement:
    """Decide where ``model`` is pruned (nothing is moved here; ``apply`` does it).

    Args:
        device: ``auto``, ``cpu`` or a device (see ``resolve_device``).
        onload: ``auto`` (onload only when the model does not fit the accelerator), ``True`` (always: weights stay
            in host memory, one block at a time on the device), ``False`` (never: the whole model is moved).
        nsamples, seqlen: the calibration, to size the room one block's work needs.
        methods: the recipe's steps, for what they need beyond that (``calibration_headroom``).
    """
    from .calibration.engine import model_device

    storage = model_dtype(model)
    if is_dispatched(model):  # the user's device_map / offload (or our onloading from an earlier prune): kept
        execution = _first_block_device(model, adapter)
        if device not in (None, "auto") and resolve_device(device) != execution:
            raise RecipeError(
                f"device={device!r}, but the model was dispatched by accelerate (device_map) with its blocks on "
                f"{execution}. Drop device, or load the model without device_map."
            )
        mode = "onloaded" if getattr(model, "hf_prune_onloaded", None) else "in_place"
        return Placement(execution, mode, storage, compute_dtype_for(execution, storage), "accelerate dispatch kept")
    current = model_device(model)
    target = resolve_device(device)
    if device in (None, "auto") and current.type != "cpu":
        target = current  # the user put it on an accelerator already
    if onload is True:
        reason = "onload: true (weights in host memory, each block onloaded while it is pruned)"
        return Placement(target, "onloaded", storage, compute_dtype_for(target, storage), reason)
    if target == current:
        reason = "no accelerator: the CPU" if target.type == "cpu" and accelerator() is None else "already there"
        return Placement(current, "in_place", storage, compute_dtype_for(current, storage), reason)
    if target.type == "cpu":
        return Placement(target, "moved", storage, compute_dtype_for(target, storage), "device: cpu")
    need = parameter_bytes(model) + calibration_headroom(model, adapter, nsamples, seqlen, methods)
    free = available_memory_bytes(target)
    if onload is False or need <= FIT_FRACTION * free:
        reason = f"model + one block's calibration work: {human_bytes(need)}, {human_bytes(free)} free"
        if need > FIT_FRACTION * free:
            reason += " (onload: false: moved anyway)"
        return Placement(target, "moved", storage, storage, reason)
    reason = (
        f"model + one block's calibration work ({human_bytes(need)}) exceeds {human_bytes(free)} free on {target}: "
        "weights stay in host memory, each block is onloaded while it is pruned"
    )
    return Placement(target, "onloaded", storage, storage, reason)


def apply(model: nn.Module, placement: Placement) -> nn.Module:
    """Put ``model`` where ``placement`` says (in place for ``moved``; accelerate hooks for ``onloaded``)."""
    if placement.mode == "moved":
        model.to(placement.device)
    elif placement.mode == "onloaded":
        onload(model, placement.device)
    return model


def onload(model: nn.Module, device: torch.device) -> nn.Module:
    """Sequential onloading: weights kept in host memory (a CPU state dict), moved to ``device`` per module forward;
    the engine keeps the block it works on materialized there (``calibration.offload.onloaded``)."""
    from accelerate import cpu_offload

    model.to("cpu")
    cpu_offload(model, execution_device=device)
    model.hf_prune_onloaded = str(device)
    return model


def _first_block_device(model: nn.Module, adapter) -> torch.device:
    from .calibration.offload import offload_hooks

    block = adapter.blocks[0] if adapter.num_blocks else model
    for _, hook in offload_hooks(block):
        return torch.device(hook.execution_device)
    hook = getattr(block, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    from .calibration.engine import model_device

    return model_device(model)
