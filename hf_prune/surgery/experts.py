"""Remove routed experts from one MoE block in place: the fused expert tensors, the router's rows, the modules'
expert counts and the config, so the model saves as a plain checkpoint of its own class."""

from __future__ import annotations

from torch import nn

from ..adapters import ModelAdapter
from ..adapters.experts import expert_count
from ..adapters.table import EXPERT_COUNT_KEYS


def _slice_dim0(module: nn.Module, keep: list[int], old: int) -> list[str]:
    """Keep rows ``keep`` of every parameter and buffer of ``module`` (not its children) with ``old`` rows."""
    changed = []
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == old:
            module._parameters[name] = nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad)
            changed.append(name)
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == old:
            module._buffers[name] = b[keep].clone()
            changed.append(name)
    return changed


def remove_experts(adapter: ModelAdapter, index: int, remove: list[int], top_k: tuple[int, int] | None = None) -> int:
    """Delete experts ``remove`` of block ``index``; return how many remain. ``top_k`` (old, new): the block's
    modules route each token to ``new`` experts (fewer remain than the router picked)."""
    experts = adapter.experts_module(index)
    old = expert_count(experts, adapter.moe_spec(index).layout)
    keep = [e for e in range(old) if e not in set(remove)]
    _slice_dim0(experts, keep, old)
    router = adapter.router_module(index)
    if router is not None:
        _slice_dim0(router, keep, old)
        if isinstance(router, nn.Linear):
            router.out_features = len(keep)
    block = adapter.blocks[index]
    for module in block.modules():
        for attr in EXPERT_COUNT_KEYS:
            if getattr(module, attr, None) == old:
                setattr(module, attr, len(keep))
        if top_k is not None and getattr(module, "top_k", None) == top_k[0]:
            module.top_k = top_k[1]
    return len(keep)
