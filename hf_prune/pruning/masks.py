"""Pure mask math shared by the weight-pruning methods: tensors in, boolean masks out (True = pruned).

Scores are laid out (out_features, in_features); a higher score means more important. No transformers import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Structure:
    """``unstructured`` (n = m = 0) or N:M: at most N non-zeros in every M consecutive input weights of a row."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_structure(text: str) -> Structure:
    """Parse ``"unstructured"`` or ``"N:M"`` (0 < N < M); raise ValueError with the accepted forms otherwise."""
    if text is None or str(text).strip().lower() == "unstructured":
        return Structure()
    match = _NM.match(str(text))
    if not match:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure {text!r}: N:M needs 0 < N < M (N weights kept in every M), got N={n}, M={m}")
    return Structure(n, m)


def num_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a sparsity prunes (floor, as the reference implementations do)."""
    return int(count * sparsity + 1e-9)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``floor(in * sparsity)`` weights of every output row (Wanda's comparison group)."""
    k = num_pruned(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``floor(numel * sparsity)`` weights of the whole matrix (magnitude baseline)."""
    k = num_pruned(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns; prune the other m - n."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, structure: Structure, group: str = "row") -> torch.Tensor:
    """One entry point: N:M masks, or unstructured masks compared per ``row`` or per ``layer``."""
    if structure.is_nm:
        return nm_mask(scores, structure.n, structure.m)
    if group == "layer":
        return layer_mask(scores, sparsity)
    return row_mask(scores, sparsity)


def expected_pruned(shape: tuple[int, int], sparsity: float, structure: Structure, group: str = "row") -> int:
    """The exact number of weights ``select_mask`` prunes for a matrix of ``shape``."""
    rows, cols = shape
    if structure.is_nm:
        return rows * (cols // structure.m) * (structure.m - structure.n)
    if group == "layer":
        return num_pruned(rows * cols, sparsity)
    return rows * num_pruned(cols, sparsity)


def row_slabs(shape: tuple[int, ...], elements: int):
    """Slices of consecutive rows of a (rows, cols) matrix holding about ``elements`` entries each (at least one row):
    work done a slab at a time keeps its temporaries that small whatever the matrix."""
    rows, cols = shape[0], shape[1] if len(shape) > 1 else 1
    step = max(1, elements // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the input dimension) holding more than N non-zeros."""
    return int(dense_groups(weight != 0, n, m))


def dense_groups(nonzero: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The count (a 0-d tensor on ``nonzero``'s device) of M-groups of a (rows, cols) non-zero pattern holding more
    than N entries."""
    rows, cols = nonzero.shape
    return (nonzero.reshape(rows, cols // m, m).sum(dim=2) > n).sum()
