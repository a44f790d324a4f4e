"""Routed experts as pruning targets: one expert's matrix inside a fused 3-D parameter, seen as a 2-D (out, in) view.

``ExpertRef.weight()`` returns a view that shares storage with the parameter, so the pure pruning math works on an
ordinary (out, in) tensor and writing into the view writes the expert's slice of the fused tensor. Where the table
has no row, ``discover_moe`` reads the layout transformers 5 records on its experts modules
(``@use_experts_implementation``: ``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .table import EXPERT_COUNT_KEYS, ExpertLayout, MoESpec


@dataclass
class ExpertRef:
    """One routed expert's matrix: ``part`` ``gate`` / ``up`` (rows of the fused gate_up matrix) or ``all``."""

    name: str
    role: str
    local: str  # block-relative path of the 3-D parameter
    experts: nn.Module
    param: str  # attribute name of the 3-D parameter on the experts module
    expert: int
    part: str
    layout: ExpertLayout
    block: int = -1

    @property
    def param_name(self) -> str:
        return self.name.rsplit("[", 1)[0]

    def weight(self) -> torch.Tensor:
        """The expert's (out, in) matrix as a view of the current parameter (materialized by offload hooks)."""
        return self.view_of(self.parameter().data)

    def parameter(self) -> nn.Parameter:
        """The fused 3-D parameter this expert's matrix lives in."""
        return getattr(self.experts, self.param)

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same (out, in) view into any tensor shaped like the parameter (a mask, a gradient)."""
        w = tensor[self.expert]
        if self.layout.transposed:
            w = w.t()
        if self.part == "all":
            return w
        half = w.shape[0] // 2
        if self.layout.interleaved:
            return w[0::2] if self.part == "gate" else w[1::2]
        return w[:half] if self.part == "gate" else w[half:]

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def device(self) -> torch.device:
        return getattr(self.experts, self.param).device


def is_fused(experts: nn.Module) -> bool:
    """Fused 3-D parameters (transformers 5), or a ModuleList of per-expert MLPs."""
    return not isinstance(experts, nn.ModuleList)


def expert_count(experts: nn.Module, layout: ExpertLayout) -> int:
    return getattr(experts, layout.down).shape[0] if is_fused(experts) else len(experts)


def expert_linear_paths(mlp: nn.Module, layout: ExpertLayout) -> dict[str, str]:
    """role -> name of the linear inside one per-expert MLP (the first of the layout's names it has)."""
    out = {}
    for role, names in layout.expert_linears.items():
        name = next((n for n in names if isinstance(getattr(mlp, n, None), nn.Linear)), None)
        if name is not None:
            out[role] = name
    return out


def expert_refs(experts: nn.Module, layout: ExpertLayout, prefix: str, local: str, block: int) -> list[ExpertRef]:
    """The gate, up and down matrices of every routed expert of one fused experts module."""
    refs: list[ExpertRef] = []
    for e in range(expert_count(experts, layout)):
        if layout.gate_up is not None:
            for part in ("gate", "up"):
                refs.append(
                    ExpertRef(
                        f"{prefix}.{local}.{layout.gate_up}[{e}].{part}",
                        f"expert_{part}",
                        f"{local}.{layout.gate_up}",
                        experts,
                        layout.gate_up,
                        e,
                        part,
                        layout,
                        block,
                    )
                )
        elif layout.up is not None:
            refs.append(
                ExpertRef(
                    f"{prefix}.{local}.{layout.up}[{e}]",
                    "expert_up",
                    f"{local}.{layout.up}",
                    experts,
                    layout.up,
                    e,
                    "all",
                    layout,
                    block,
                )
            )
        refs.append(
            ExpertRef(
                f"{prefix}.{local}.{layout.down}[{e}]",
                "expert_down",
                f"{local}.{layout.down}",
                experts,
                layout.down,
                e,
                "all",
                layout,
                block,
            )
        )
    return refs


def discover_moe(block: nn.Module, config) -> MoESpec | None:
    """An MoESpec for a block of a family the table does not know, from transformers 5's experts decorator
    attributes; None when the block has no such experts module."""
    for path, module in block.named_modules():
        if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
            continue
        names = dict(module.named_parameters(recurse=False))
        first = "gate_up_proj" if module.has_gate else "up_proj"
        if first not in names or "down_proj" not in names or names["down_proj"].dim() != 3:
            continue
        layout = ExpertLayout(
            gate_up=first if module.has_gate else None,
            up=None if module.has_gate else first,
            transposed=bool(module.is_transposed),
            interleaved=not getattr(module, "is_concatenated", True),
            gate_up_bias=f"{first}_bias" if getattr(module, "has_bias", False) else None,
            down_bias="down_proj_bias" if getattr(module, "has_bias", False) else None,
        )
        parent, _, _ = path.rpartition(".")
        router = _find_router(block, parent, names["down_proj"].shape[0])
        key = next((k for k in EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), EXPERT_COUNT_KEYS[0])
        return MoESpec(path, router or "", layout, key)
    return None


def _find_router(block: nn.Module, parent: str, num_experts: int) -> str | None:
    """The sibling of the experts module whose weight has one row per expert."""
    owner = block.get_submodule(parent) if parent else block
    for name, module in owner.named_children():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return f"{parent}.{name}" if parent else name
    return None
