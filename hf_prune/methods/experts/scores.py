"""Expert importance and the choice of experts to remove: pure math, tensors in, indices out.

REAP (Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression", Cerebras 2025): an expert's
score is the mean, over the tokens routed to it, of the norm of what it adds to the block's output, g(x) * ||f(x)||
(Llama 4 scales the expert's input instead of its output: ||f(g(x) * x)||). Never-routed experts score 0.
"""

from __future__ import annotations

import torch


class ExpertScores:
    """Running per-expert sums over calibration tokens: routed-token counts and contribution norms."""

    def __init__(self, num_experts: int):
        self.tokens = torch.zeros(num_experts, dtype=torch.float64)
        self.contribution = torch.zeros(num_experts, dtype=torch.float64)

    def update(self, e: int, contribution: torch.Tensor) -> None:
        """``contribution``: (T_e, H) what expert ``e`` added to the output of each token routed to it."""
        self.tokens[e] += contribution.shape[0]
        self.contribution[e] += float(contribution.float().norm(dim=-1).double().sum())

    def reap(self) -> torch.Tensor:
        return self.contribution / self.tokens.clamp(min=1)

    def frequency(self) -> torch.Tensor:
        return self.tokens / self.tokens.sum().clamp(min=1)


def random_scores(num_experts: int, seed: int, block: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + block)
    return torch.rand(num_experts, generator=generator, dtype=torch.float64)


def lowest(scores: torch.Tensor, k: int, groups: int = 1) -> list[int]:
    """The ``k`` lowest-scoring experts (ties: lower index first); with ``groups`` > 1 (DeepSeek's group-limited
    routing over equal contiguous groups), ``k / groups`` from each group so the groups stay equal."""
    n = scores.numel()
    size = n // groups
    per_group = k // groups
    removed: list[int] = []
    for g in range(groups):
        part = scores[g * size : (g + 1) * size]
        order = sorted(range(size), key=lambda i: (float(part[i]), i))
        removed += [g * size + i for i in order[:per_group]]
    return sorted(removed)
