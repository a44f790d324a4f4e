"""Running statistics of a linear's inputs, in float32, with memory proportional to in_features (or its square).

Each accumulator takes activations of shape (..., in_features) and never keeps them.
"""

from __future__ import annotations

import torch

from .. import distributed


class InputNormStats:
    """Sum over tokens of x_j^2 per input channel: Wanda's ||X_j||_2^2."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sq_sum.device, dtype=torch.float32)
        self.sq_sum += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over the ranks of a data-parallel run (once; a no-op in a single process)."""
        if distributed.active() and not getattr(self, "_reduced", False):
            distributed.all_reduce_sum(self.sq_sum)
            self.tokens = int(distributed.all_reduce_numbers(self.tokens)[0])
            self._reduced = True

    @property
    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt()


class HessianStats:
    """H = 2/n * sum_t x_t x_t^T, kept as a running average (SparseGPT's layer-wise Hessian)."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        if self.H is None:
            raise RuntimeError("these Hessian statistics were handed to a solver (consume()); they take no more input")
        x = x.reshape(-1, x.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:  # an expert no token of this chunk was routed to
            return
        total = self.tokens + n
        self.H *= self.tokens / total
        x = x * (2.0 / total) ** 0.5
        self.H.addmm_(x.t(), x)
        self.tokens = total

    def all_reduce(self) -> None:
        """Combine the ranks' running averages into the average over all their tokens (once)."""
        if distributed.active() and not getattr(self, "_reduced", False):
            self.H *= self.tokens / 2.0  # back to the sum of x x^T
            distributed.all_reduce_sum(self.H)
            self.tokens = int(distributed.all_reduce_numbers(self.tokens)[0])
            self.H *= 2.0 / max(self.tokens, 1)
            self._reduced = True

    def consume(self) -> torch.Tensor:
        """Hand H over to a solver that overwrites it in place (no second n x n matrix); the statistics end here."""
        H, self.H = self.H, None
        if H is None:
            raise RuntimeError("these Hessian statistics were already consumed")
        return H


class CosineStats:
    """Mean cosine similarity between two hidden-state streams, over all tokens or the last token of each row.

    Accumulates 1 - cos = ||a/|a| - b/|b|||^2 / 2 in float32 per token (accurate near cos = 1, where arccos is steep,
    without a float64 copy of the activations) and sums it in float64."""

    def __init__(self, last_token_only: bool = False):
        self.last_token_only = last_token_only
        self.gap = 0.0  # sum over tokens of 1 - cos
        self.count = 0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.last_token_only:
            a, b = a[:, -1, :], b[:, -1, :]
        a = torch.nn.functional.normalize(a.reshape(-1, a.shape[-1]).float(), dim=-1)
        b = torch.nn.functional.normalize(b.reshape(-1, b.shape[-1]).to(a.device).float(), dim=-1)
        gap = (a - b).pow(2).sum(dim=-1).mul_(0.5).clamp_(0.0, 2.0)
        self.gap += float(gap.sum(dtype=torch.float64))
        self.count += gap.numel()

    def all_reduce(self) -> None:
        if distributed.active() and not getattr(self, "_reduced", False):
            self.gap, self.count = distributed.all_reduce_numbers(self.gap, self.count)
            self._reduced = True

    @property
    def mean(self) -> float:
        self.all_reduce()
        return 1.0 - self.gap / max(self.count, 1)
