"""Which visual tokens to keep: pure tensor functions (no transformers import). Each returns sorted indices into
the given set of image tokens."""

from __future__ import annotations

import torch


def budget(num_image_tokens: int, keep: float | int) -> int:
    """Tokens to keep: a ratio in (0, 1] of the image tokens, or a count (clipped to the image tokens there are)."""
    if isinstance(keep, float) and keep <= 1.0:
        return max(1, min(num_image_tokens, round(keep * num_image_tokens)))
    return max(1, min(num_image_tokens, int(keep)))


def top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """FastV: the k image tokens that receive the most attention."""
    return torch.topk(scores.float(), k).indices.sort().values


def uniform_stride(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over n tokens (a spatial subsampling baseline)."""
    return torch.linspace(0, n - 1, k).round().long().unique(sorted=True)


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune: a max-min diverse subset under cosine distance (greedy: start from the token farthest from the
    others on average, then repeatedly add the token whose distance to the chosen set is largest).

    Duplicated tokens are never chosen twice while a distinct one is left: a duplicate is at distance 0 from its copy.
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - x @ x.t()
    n = x.shape[0]
    chosen = [int(distance.sum(dim=1).argmax())]
    nearest = distance[chosen[0]].clone()
    nearest[chosen[0]] = -1.0
    for _ in range(min(k, n) - 1):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, distance[nxt])
        nearest[chosen] = -1.0
    return torch.tensor(sorted(chosen), dtype=torch.long)
