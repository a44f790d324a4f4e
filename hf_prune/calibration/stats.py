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

    @property
    def diag_sq_sum(self) -> torch.Tensor:
        """sum_t x_j^2 recovered from the diagonal (for Wanda-style scores on a Hessian)."""
        return self.H.diagonal() * self.tokens / 2.0


class CosineStats:
    """Mean cosine similarity between two hidden-state streams, over all tokens or the last token of each row."""

    def __init__(self, last_token_only: bool = False):
        self.last_token_only = last_token_only
        self.total = 0.0
        self.count = 0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.last_token_only:
            a, b = a[:, -1, :], b[:, -1, :]
        a = a.reshape(-1, a.shape[-1]).double()  # float64: arccos is steep near cos = 1
        b = b.reshape(-1, b.shape[-1]).to(a.device).double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
        self.total += float(cos.double().sum())
        self.count += cos.numel()

    def all_reduce(self) -> None:
        if distributed.active() and not getattr(self, "_reduced", False):
            self.total, self.count = distributed.all_reduce_numbers(self.total, self.count)
            self._reduced = True

    @property
    def mean(self) -> float:
        self.all_reduce()
        return self.total / max(self.count, 1)
