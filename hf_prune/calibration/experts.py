"""What each routed expert sees during calibration, from one call of an experts module.

An experts module is called once per MoE block forward with every token and the router's choice. ``ExpertCall``
splits that call by expert: the tokens the router sent to expert e (its real inputs) and their routing weights, or,
for statistics over everything, all tokens. ``expert_hidden`` / ``expert_output`` recompute one expert on given
inputs from its current (possibly just pruned) matrices, with the module's own gate activation, so the down
projection's inputs and an expert's contribution are known without touching the block's forward.

Nothing here knows about any pruning method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import ExpertLayout, MoESpec, get_submodule

ROUTED, ALL = "routed", "all"


@dataclass
class ExpertCall:
    """One call of an experts module, split by expert."""

    layout: ExpertLayout
    num_experts: int
    hidden: torch.Tensor  # (T, H): every token, unscaled
    _x: torch.Tensor  # what the module received
    _index: torch.Tensor | None = None  # (T, k) chosen experts ("routed" call)
    _weights: torch.Tensor | None = None  # (T, k) their routing weights

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs (T_e, H), routing weights (T_e,) or None when already applied to the inputs) of expert ``e``."""
        if self.layout.call == "scaled_rows":
            rows = self._x.view(self.num_experts, -1, self._x.shape[-1])[e]
            return rows[rows.abs().sum(-1) > 0], None
        hit = self._index == e
        tokens = hit.any(-1).nonzero().squeeze(-1)
        weights = (self._weights * hit).sum(-1)[tokens]
        return self.hidden[tokens], weights


def split_expert_call(
    layout: ExpertLayout, num_experts: int, args: tuple, kwargs: dict, parent_hidden: torch.Tensor | None = None
) -> ExpertCall:
    """Read (hidden, top_k_index, top_k_weights) or Llama 4's scaled rows from the experts module's arguments."""
    values = list(args) + [v for k, v in kwargs.items() if torch.is_tensor(v)]
    x = values[0]
    if layout.call == "scaled_rows":
        hidden = parent_hidden.reshape(-1, x.shape[-1]) if parent_hidden is not None else x
        return ExpertCall(layout, num_experts, hidden, x)
    return ExpertCall(layout, num_experts, x.reshape(-1, x.shape[-1]), x, values[1], values[2])


def _matrix(experts: nn.Module, name: str, e: int, transposed: bool) -> torch.Tensor:
    w = getattr(experts, name)[e]
    return w.t() if transposed else w


def _bias(experts: nn.Module, name: str | None, e: int) -> torch.Tensor | None:
    return getattr(experts, name)[e] if name else None


@torch.no_grad()
def expert_hidden(experts: nn.Module, layout: ExpertLayout, e: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's inputs of expert ``e`` on inputs ``x``: act(gate) * up, as the module computes it."""
    first = layout.gate_up or layout.up
    w = _matrix(experts, first, e, layout.transposed)
    out = nn.functional.linear(x.to(w.dtype), w, _bias(experts, layout.gate_up_bias, e))
    if layout.gate_up is None:
        return experts.act_fn(out)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(out)
    gate, up = (out[..., 0::2], out[..., 1::2]) if layout.interleaved else out.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


@torch.no_grad()
def expert_output(experts: nn.Module, layout: ExpertLayout, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output on inputs ``x`` (before the routing weight)."""
    h = expert_hidden(experts, layout, e, x)
    w = _matrix(experts, layout.down, e, layout.transposed)
    return nn.functional.linear(h, w, _bias(experts, layout.down_bias, e))


@torch.no_grad()
def mlp_hidden(mlp: nn.Module, layout: ExpertLayout, x: torch.Tensor) -> torch.Tensor:
    """The down projection's inputs of one per-expert MLP (ModuleList layout): act(gate(x)) * up(x)."""
    from ..adapters.experts import expert_linear_paths

    paths = expert_linear_paths(mlp, layout)
    act = getattr(mlp, "act_fn", None) or mlp.act
    up = getattr(mlp, paths["expert_up"])(x)
    return act(getattr(mlp, paths["expert_gate"])(x)) * up if "expert_gate" in paths else act(up)


def parent_path(experts_path: str) -> str:
    return experts_path.rpartition(".")[0]


class ParentInput:
    """Keeps the latest input of an MoE block's top module (Llama 4 scales the experts' inputs by the router score,
    so the unscaled hidden states come from the module that holds the experts)."""

    def __init__(self, block: nn.Module, experts_path: str):
        self.module = get_submodule(block, parent_path(experts_path))
        self.hidden: torch.Tensor | None = None

    def hook(self):
        def record(module, args, kwargs):
            self.hidden = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))

        return self.module.register_forward_pre_hook(record, with_kwargs=True)


def expert_call_hooks(
    block: nn.Module, spec: MoESpec, on_call: Callable[[ExpertCall], None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that hand ``on_call`` every call of the block's (fused) experts module, split by expert; for Llama 4's
    scaled rows, the unscaled hidden states come from the module holding the experts."""
    experts = block.get_submodule(spec.experts)
    num_experts = getattr(experts, spec.layout.down).shape[0]
    parent = ParentInput(block, spec.experts) if spec.layout.call == "scaled_rows" else None

    def hook(module, args, kwargs):
        on_call(split_expert_call(spec.layout, num_experts, args, kwargs, parent.hidden if parent else None))

    handles = [experts.register_forward_pre_hook(hook, with_kwargs=True)]
    return handles + ([parent.hook()] if parent is not None else [])
