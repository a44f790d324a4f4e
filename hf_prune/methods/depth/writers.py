"""What writes a block's MLP output into the residual stream, for the least-squares map that replaces the removed run
after it: the module whose output is M (the down projection of a dense block, the whole mixture-of-experts module
of an MoE block) and every matrix whose outputs add up to M, each of which folds the map (a dense down projection;
every routed expert's down matrix, their biases, the shared experts' down projections). An MoE output is a sum of
(gate-weighted) expert outputs, so ``M T`` is the same sum with every down matrix W replaced by ``T^T W``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...adapters import ExpertRef, LinearRef, ModelAdapter, get_submodule, weight_out_in
from .compensation import fold_into_writer


@dataclass
class MlpWriter:
    """``module``: whose forward output is the MLP output M; ``linears``: down projections (with their biases);
    ``experts``: routed experts' down matrices (views into fused tensors, or per-expert linears); ``expert_bias``:
    the name of the fused (experts, hidden) down bias on ``experts_module``, if it has one."""

    name: str
    module: nn.Module
    linears: list[LinearRef] = field(default_factory=list)
    experts: list[ExpertRef | LinearRef] = field(default_factory=list)
    experts_module: nn.Module | None = None
    expert_bias: str | None = None  # attribute of experts_module: looked up when folding (onloading replaces it)

    @torch.no_grad()
    def fold(self, T: torch.Tensor) -> None:
        """Make the module output ``M @ T`` (in place; inside the block's materialized context, where every tensor
        is read again: offload hooks put new parameters on the execution device)."""
        T = T.to(dtype=torch.float32)
        for ref in [*self.linears, *self.experts]:
            if isinstance(ref, ExpertRef):
                view = ref.weight()  # a view into the fused tensor: writing it writes the expert's slice
                view.copy_(fold_into_writer(view, None, T)[0])
                continue
            w, bias = weight_out_in(ref.module), ref.module.bias
            new_w, new_b = fold_into_writer(w, bias.data if bias is not None else None, T)
            w.copy_(new_w)
            if bias is not None:
                bias.data.copy_(new_b)
        if self.expert_bias is not None:
            b = getattr(self.experts_module, self.expert_bias).data
            b.copy_((b.float() @ T.to(device=b.device)).to(b.dtype))


def mlp_writer(adapter: ModelAdapter, index: int) -> MlpWriter | None:
    """Block ``index``'s MLP writer, or None when hf_prune does not know one."""
    spec = adapter.moe_spec(index)
    linears = adapter.linears(index)
    if spec is None:
        down = next((r for r in linears if r.role == "down"), None)
        return MlpWriter(down.name, down.module, [down]) if down is not None else None
    path = spec.experts.rpartition(".")[0]
    module = get_submodule(adapter.blocks[index], path) if path else None
    if module is None:
        return None
    experts = [r for r in adapter.experts(index) if r.role == "expert_down"]
    experts_module = adapter.experts_module(index)
    bias = spec.layout.down_bias
    if bias is not None and getattr(experts_module, bias, None) is None:  # the layout allows one; this model has none
        bias = None
    shared = [r for r in linears if r.role == "shared_down"]
    return MlpWriter(f"{adapter.block_name(index)}.{path}", module, shared, experts, experts_module, bias)
