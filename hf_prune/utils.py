"""Small helpers shared by the orchestration code: logging, memory and timing."""

from __future__ import annotations

import importlib.util
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import HFPruneError

logger = logging.getLogger("hf_prune")


def setup_logging(level: int = logging.INFO) -> None:
    """Send hf_prune's log records to stderr once (the CLI calls this; library users configure logging themselves)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[hf_prune] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux, VmHWM of /proc/self/status: the peak of this process's own address space. (ru_maxrss is not: it keeps
    the parent's resident size at fork through exec, so a process started by a big parent reports the parent's
    size.) Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_cuda_bytes() -> int | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())))
    return None


def available_memory_bytes(device: torch.device) -> int:
    """Memory still free on `device` (CUDA / XPU free memory, MPS's recommended budget left, or the host's
    available RAM). On CUDA, blocks PyTorch's caching allocator holds but does not use count as free."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "xpu" and hasattr(torch.xpu, "mem_get_info"):
        free, _ = torch.xpu.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    import psutil

    return int(psutil.virtual_memory().available)


def map_tensors(value, fn):
    """``fn`` applied to every tensor inside ``value`` (a tensor or nested tuple/list/dict of them)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


@contextmanager
def timed(store: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cache_dir() -> str:
    """Where hf_prune keeps converted packaged models: $HF_PRUNE_CACHE, else ~/.cache/hf_prune."""
    return os.environ.get("HF_PRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_prune"))


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in a floating-point ``tensor``: its min and max propagate both, so one reduction answers
    without a boolean temporary the size of the tensor (and with one device sync)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def count_zeros(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Entries of ``tensor`` equal to zero, counted over slices of its first dimension holding about ``chunk``
    entries (on a GPU ``count_nonzero`` builds a boolean copy of its input: a fused expert tensor's would be GBs).
    Slices are views, so a transposed weight is never copied."""
    t = tensor.detach()
    if t.dim() == 0:
        return int(t == 0)
    step = max(1, chunk // max(t.numel() // max(t.shape[0], 1), 1))  # entries per first-dimension slice
    nonzero = sum(int(torch.count_nonzero(t[i : i + step])) for i in range(0, t.shape[0], step))
    return t.numel() - nonzero


class OffloadedCopy:
    """A copy of a tensor kept outside the memory it works in, to refill it later (``restore_into``).

    ``file_bytes``: a tensor at least this big goes to an unnamed temporary file in $TMPDIR, written and read by
    system calls in slabs (page cache, never resident in the process; gone with the process, even a killed one); an
    accelerator's tensor passes through host memory one slab at a time. A smaller one is cloned into host memory
    (``small_on="host"``) or on its own device (``"device"``). ``close()`` (or leaving the ``with`` block) frees it."""

    FILE_BYTES = 64 << 20
    CHUNK = 1 << 28

    def __init__(self, tensor: torch.Tensor, file_bytes: int | None = None, small_on: str = "host"):
        self._copy: torch.Tensor | None = None
        self._file = None
        t = tensor.detach()
        self.shape, self.dtype = tuple(t.shape), t.dtype
        limit = self.FILE_BYTES if file_bytes is None else file_bytes
        accelerator = t.device.type != "cpu"
        if t.numel() * t.element_size() < limit:
            self._copy = t.to("cpu" if small_on == "host" else t.device, copy=True)
            return
        import tempfile

        self._file = tempfile.TemporaryFile(prefix="hf_prune-", buffering=0)
        for part in self._slabs(t.contiguous().view(-1)):
            view = memoryview(_bytes_of(part.cpu() if accelerator else part))
            while view:
                written = self._file.write(view)
                if not written:
                    raise OSError("could not write the offloaded copy")
                view = view[written:]

    def _slabs(self, flat: torch.Tensor):
        step = max(1, self.CHUNK // flat.element_size())
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]

    def restore_into(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            shape = tuple(tensor.shape)
            raise ValueError(f"cannot restore a {self.dtype} {self.shape} copy into {tensor.dtype} {shape}")
        if self._copy is not None:
            tensor.copy_(self._copy)
            return
        if self._file is None:
            raise RuntimeError("this copy was closed")
        target = tensor if tensor.is_contiguous() else torch.empty_like(tensor, memory_format=torch.contiguous_format)
        self._file.seek(0)
        for part in self._slabs(target.view(-1)):
            host = part if part.device.type == "cpu" else torch.empty(part.shape, dtype=part.dtype)
            view = memoryview(_bytes_of(host))
            while view:
                n = self._file.readinto(view)
                if not n:
                    raise OSError("the offloaded copy is truncated")
                view = view[n:]
            if host is not part:
                part.copy_(host)
        if target is not tensor:
            tensor.copy_(target)

    def close(self) -> None:
        self._copy = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> OffloadedCopy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _bytes_of(tensor: torch.Tensor):
    """A writable byte view (numpy) of a contiguous host tensor's storage, any dtype (bf16 included)."""
    return tensor.view(-1).view(torch.uint8).numpy()


def installed_package_folder(module: str, pip: str) -> Path:
    """An installed package's folder, found without importing it (an actionable error naming ``pip`` if absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HFPruneError(f"The package '{module}' is not installed. Install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])
