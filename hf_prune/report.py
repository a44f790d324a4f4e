"""PruningReport: what was pruned, how much, how long it took, how much memory, and evaluation results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .utils import human_bytes


@dataclass
class ModuleReport:
    name: str
    role: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float  # measured: fraction of exact zeros in the weight after pruning
    pruned: int  # number of weights the mask removed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleReport:
        """Back from ``asdict`` / JSON (where the shape became a list)."""
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass
class StepReport:
    method: str
    config: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # the keys the user set (non-default), for display
    time_s: float = 0.0
    modules: list[ModuleReport] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        """Back from ``asdict`` / JSON (a resumed prune's finished steps)."""
        return cls(**{**data, "modules": [ModuleReport.from_dict(m) for m in data.get("modules", [])]})

    @property
    def sparsity(self) -> float | None:
        """Measured sparsity over the modules this step pruned (weighted by size)."""
        total = sum(m.shape[0] * m.shape[1] for m in self.modules)
        if not total:
            return None
        return sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules) / total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over the model's unique parameters (tied weights counted once)."""
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen or p.device.type == "meta":
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int((p != 0).sum())
    return total, nonzero


@dataclass
class PruningReport:
    model: str
    family: str
    num_blocks: int
    calibration: dict[str, Any] | None = None
    steps: list[StepReport] = field(default_factory=list)
    params_before: int = 0
    nonzero_before: int = 0
    params_after: int = 0
    nonzero_after: int = 0
    time_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int | None = None
    placement: dict[str, Any] | None = None  # where the prune ran (device, mode, storage and compute dtypes)
    evaluation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all parameters of the model after pruning."""
        return 1.0 - self.nonzero_after / self.params_after if self.params_after else 0.0

    def to_markdown(self) -> str:
        lines = [
            f"## Pruning report: {self.model}",
            "",
            f"- family: `{self.family}`, decoder blocks: {self.num_blocks}",
        ]
        if self.calibration:
            c = self.calibration
            lines.append(
                f"- calibration: {c.get('nsamples')} x {c.get('seqlen')} tokens of `{c.get('source')}`, "
                f"seed {c.get('seed')}"
            )
        if self.placement:
            p = self.placement
            line = f"- ran on: {p['device']} ({p['mode']}), weights {p['storage_dtype']}"
            if p["compute_dtype"] != p["storage_dtype"]:
                line += f", blocks computed in {p['compute_dtype']}"
            lines.append(line)
        lines += [
            f"- parameters: {self.params_before:,} -> {self.params_after:,}; non-zero {self.nonzero_before:,} -> "
            f"{self.nonzero_after:,} (model sparsity {self.sparsity:.2%})",
            f"- time: {self.time_s:.1f} s; peak RSS {human_bytes(self.peak_rss_bytes)}"
            + (f"; peak CUDA {human_bytes(self.peak_cuda_bytes)}" if self.peak_cuda_bytes else ""),
            "",
            "| step | method | settings | pruned modules | measured sparsity | all block weights | time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        left: list[str] = []
        for i, s in enumerate(self.steps):
            settings = ", ".join(f"{k}={v}" for k, v in (s.settings or s.config).items() if k != "method")
            sp = s.sparsity
            coverage = s.details.get("coverage") or {}
            block = coverage.get("sparsity_all_block_weights")
            lines.append(
                f"| {i} | {s.method} | {settings} | {len(s.modules)} | "
                f"{'-' if sp is None else f'{sp:.4f}'} | {'-' if block is None else f'{block:.4f}'} | {s.time_s:.1f} |"
            )
            left += [
                f"step {i} left `{u['name']}` dense ({u['role'] or 'no role'}, {u['numel']:,} weights): "
                f"{u['include_with']}"
                for u in coverage.get("untouched", [])
            ]
        if left:
            lines += ["", *(f"- {line}" for line in left)]
        if self.evaluation:
            lines += ["", "| evaluation | value |", "|---|---|"]
            for k, v in self.evaluation.items():
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        for note in self.notes:
            lines.append(f"\n> {note}")
        return "\n".join(lines) + "\n"
