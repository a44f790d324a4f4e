"""Data-parallel calibration with torch.distributed: every rank holds the model and walks the blocks over its own
share of the calibration windows; statistics are summed over the ranks before anything is decided, so every rank
prunes the same weights the same way and the model stays identical on all of them.

Launched with ``torchrun --nproc-per-node N $(which hf-prune) ...`` (or the Python API under torchrun): the process
group is initialised from the environment (nccl on CUDA, gloo on CPU) unless the caller already did. Without
torchrun (WORLD_SIZE unset or 1) every function here is a no-op and nothing changes.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .utils import logger

DEFAULT_TIMEOUT_S = 1800  # a collective waits at most this long for a rank that failed or hangs
COLLECTIVES = {"seconds": 0.0, "calls": 0}  # time this process spent in collectives (benchmarks read it)


@contextmanager
def _timed():
    start = time.perf_counter()
    try:
        yield
    finally:
        COLLECTIVES["seconds"] += time.perf_counter() - start
        COLLECTIVES["calls"] += 1


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: int | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (if launched so and not done yet);
    return whether a group of more than one process is up."""
    if dist.is_available() and not dist.is_initialized() and launched_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s or int(os.environ.get("HF_PRUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
        logger.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return active()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(count: int) -> slice:
    """This rank's contiguous share of ``count`` items (the first ``count % world`` ranks take one more)."""
    size, r = world_size(), rank()
    base, extra = divmod(count, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def _device_for_collectives(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (returned for convenience); a no-op in a single process."""
    if not active():
        return tensor
    device = _device_for_collectives(tensor)
    with _timed():
        if tensor.device == device:
            dist.all_reduce(tensor)
            return tensor
        moved = tensor.to(device)
        dist.all_reduce(moved)
        tensor.copy_(moved.to(tensor.device))
    return tensor


def all_reduce_numbers(*values: float) -> list[float]:
    """Sum Python numbers over the ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum(t)
    return t.tolist()


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``tensor`` (a view is fine) on every rank with rank ``src``'s values, in place."""
    if not active():
        return tensor
    device = _device_for_collectives(tensor)
    direct = tensor.device == device and tensor.is_contiguous()
    moved = tensor if direct else tensor.to(device).contiguous()
    with _timed():
        dist.broadcast(moved, src)
    if not direct:
        tensor.copy_(moved.to(tensor.device))
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    with _timed():
        dist.all_gather_object(out, obj)
    return out


def balanced_assignment(costs: list[float], ranks: int) -> list[int]:
    """The rank that does each job: largest first, each to the least loaded rank (deterministic)."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def barrier() -> None:
    if active():
        with _timed():
            dist.barrier()
