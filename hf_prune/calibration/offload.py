"""Models dispatched by accelerate with offloaded weights (``device_map`` with "cpu"/"disk" entries, ``cpu_offload``).

Offloaded parameters live on the meta device and are loaded from the hook's ``weights_map`` for each forward, then
dropped again: a change made to them during the forward would be lost. ``onloaded(block)`` keeps one block's
weights materialized while it is pruned and writes the pruned tensors back into the weights map afterwards.

Write-back never touches files: a CPU-offloaded tensor is updated in place; a disk-offloaded one is replaced by an
in-memory copy in the loader's ``state_dict`` (which the loader reads first), so the offload folder and the original
checkpoint stay as they were. The memory-bounded path for models larger than RAM is the streaming mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModelError


def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def offload_hooks(root: nn.Module) -> Iterator[tuple[nn.Module, object]]:
    """(module, AlignDevicesHook) pairs under ``root`` whose weights are offloaded."""
    for module in root.modules():
        for hook in _hooks_of(module):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                yield module, hook


def _tensor_names(module: nn.Module, hook) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [
        name
        for name, _ in named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    ]


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    return getattr(owner, leaf)


def _write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    dataset = getattr(weights_map, "dataset", None)
    prefix = getattr(weights_map, "prefix", "")
    # cpu_offload: a dict of CPU tensors; device_map offload: an OffloadedWeightsLoader (state_dict + disk index).
    store = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", None)
    if not isinstance(store, dict):
        raise UnsupportedModelError(
            f"Cannot write the pruned '{prefix}{name}' back into this model's offload map "
            f"({type(weights_map).__name__}). Load the model without offloading, or use the streaming mode."
        )
    key = f"{prefix}{name}"
    value = tensor.detach().to("cpu")
    current = store.get(key)
    if isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype:
        current.copy_(value)
    else:
        store[key] = value.clone()


@contextmanager
def onloaded(root: nn.Module):
    """Keep ``root``'s offloaded weights on their execution device for the duration; write changes back after."""
    from accelerate.utils import set_module_tensor_to_device

    entries = list(offload_hooks(root))
    names = {}
    for module, hook in entries:
        names[id(hook)] = _tensor_names(module, hook)
        for name in names[id(hook)]:
            set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[name])
        hook.offload = False
    try:
        yield
    finally:
        for module, hook in entries:
            for name in names[id(hook)]:
                _write_back(hook.weights_map, name, _get_tensor(module, name))
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True
