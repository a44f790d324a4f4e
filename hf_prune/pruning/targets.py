"""Which weights a step prunes (roles and regexes over linears and routed experts), and what it left untouched."""

from __future__ import annotations

import re
from typing import Any

from ..adapters import DEFAULT_EXCLUDED_ROLES, LINEAR_ROLES, ROUTER_ROLE, LinearRef, ModelAdapter, WeightRef
from ..errors import RecipeError
from ..utils import count_zeros


def matches(ref: WeightRef, patterns: list[str]) -> bool:
    """A role (exact) or a regex searched in the target's full name (experts: ``...gate_up_proj[3].gate``)."""
    for p in patterns:
        if p == ref.role:
            return True
        if p not in LINEAR_ROLES and re.search(p, ref.name):
            return True
    return False


def select_targets(
    adapter: ModelAdapter, targets: list[str] | None, ignore: list[str], experts: bool = True
) -> list[WeightRef]:
    """The linears (and, with ``experts``, routed experts' matrices) a step prunes. Default: all of them except
    routers, which only an explicit ``targets`` entry selects."""
    refs = adapter.all_weight_targets() if experts else adapter.all_linears()
    if targets is None:
        chosen = [r for r in refs if r.role not in DEFAULT_EXCLUDED_ROLES and not matches(r, ignore)]
    else:
        chosen = [r for r in refs if matches(r, targets) and not matches(r, ignore)]
    if not chosen:
        raise RecipeError(
            f"No linear matches targets={targets} ignore={ignore}. Roles in this model: "
            f"{sorted({r.role for r in refs})}; names look like {refs[0].name if refs else '?'}."
        )
    return chosen


def _router_role(adapter: ModelAdapter, name: str) -> str | None:
    prefix = adapter.blocks_path + "."
    index, _, local = name[len(prefix) :].partition(".")
    routers = adapter.router_paths(int(index)) if index.isdigit() else set()
    return ROUTER_ROLE if any(local.startswith(r + ".") for r in routers) else None


def _include_with(role: str | None) -> str:
    if role == ROUTER_ROLE:
        return "routers are never default targets; add 'router' to targets to prune them"
    if role is not None:
        return f"add '{role}' to targets (or drop it from ignore)"
    return (
        "not a pruning target of this adapter: a layout it does not know (add the family to "
        "hf_prune/adapters/table.py)"
    )


class Coverage:
    """Nothing silently dense: sparsity over what a step targeted and over every weight tensor of the decoder blocks
    (2-D and fused 3-D), and what it left untouched (targets it did not select, and weight tensors no target
    reaches), grouped over blocks and experts, with the ``targets`` entry that would include them.

    ``add_block(i)`` counts block ``i`` while its weights are materialized (offload, streaming); ``result()`` sums up.
    """

    def __init__(self, adapter: ModelAdapter, targeted: list[WeightRef]):
        self.adapter = adapter
        self.chosen = {r.name for r in targeted}
        self.block_index = re.compile(rf"^{re.escape(adapter.blocks_path)}\.(\d+)\.")
        self.groups: dict[str, dict[str, Any]] = {}
        self.counts = {"block_weight_tensors": 0, "block_weights": 0, "zeros": 0, "targeted": 0, "targeted_zeros": 0}

    def _add(self, name: str, role: str | None, numel: int) -> None:
        blocks_path = self.adapter.blocks_path
        block = int(self.block_index.match(name).group(1))
        key = re.sub(r"\[\d+\]", "[*]", self.block_index.sub(f"{blocks_path}.*.", name))
        entry = self.groups.setdefault(key, {"name": key, "role": role, "blocks": [], "numel": 0})
        if block not in entry["blocks"]:
            entry["blocks"].append(block)
        entry["numel"] += numel

    def add_block(self, index: int) -> None:
        adapter, c = self.adapter, self.counts
        refs = adapter.weight_targets(index)
        reached = {r.param_name for r in refs}
        for ref in refs:
            w = ref.weight()
            if ref.name in self.chosen:
                c["targeted"] += w.numel()
                c["targeted_zeros"] += count_zeros(w)
            else:
                self._add(ref.name, ref.role, w.numel())
        prefix = adapter.block_name(index)
        for local, p in adapter.blocks[index].named_parameters():
            if p.dim() < 2 or local.endswith("bias"):
                continue  # norms and biases (gpt-oss's per-expert biases are 2-D) are not weights
            name = f"{prefix}.{local}"
            c["block_weight_tensors"] += 1
            c["block_weights"] += p.numel()
            c["zeros"] += count_zeros(p)
            if name not in reached:
                self._add(name, _router_role(adapter, name), p.numel())

    def result(self) -> dict[str, Any]:
        c = self.counts
        for entry in self.groups.values():
            entry["include_with"] = _include_with(entry["role"])
        return {
            "block_weight_tensors": c["block_weight_tensors"],
            "block_weights": c["block_weights"],
            "targeted_weights": c["targeted"],
            "sparsity_targeted": round(c["targeted_zeros"] / max(c["targeted"], 1), 6),
            "sparsity_all_block_weights": round(c["zeros"] / max(c["block_weights"], 1), 6),
            "untouched": list(self.groups.values()),
        }


def split_refs(refs: list[WeightRef]) -> tuple[list[LinearRef], list[WeightRef]]:
    """(plain linears, routed experts' matrices: fused views or per-expert linears)."""
    return [r for r in refs if r.expert is None], [r for r in refs if r.expert is not None]
