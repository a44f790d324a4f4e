"""Pure math of structured width pruning: statistics of a projection's input channels, importance of channels and
of channel groups (attention heads, KV groups), and the compensation of what the removed channels contributed.

A "channel" is one input column of the consuming projection: an MLP neuron (an input of ``down_proj``) or one of
a head's ``head_dim`` outputs (an input of ``o_proj``).
"""

from __future__ import annotations

import torch

from ... import distributed

CRITERIA = ("activation", "fluctuation", "magnitude")
COMPENSATIONS = ("none", "bias", "least_squares")


class ChannelStats:
    """Running per-channel sums of x, |x| and x^2 over tokens; with ``second_moment`` also sum x x^T (the
    channels' uncentered second moment, for the least-squares refit)."""

    def __init__(self, channels: int, device: torch.device, second_moment: bool = False):
        zeros = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.sum, self.abs_sum, self.sq_sum = zeros(), zeros(), zeros()
        self.gram = torch.zeros(channels, channels, dtype=torch.float32, device=device) if second_moment else None
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        # per-chunk sums in float32 (no float64 copy of the activations), accumulated in float64
        self.sum += x.sum(0).double()
        self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over the ranks of a data-parallel run (once; a no-op in a single process)."""
        if distributed.active() and not getattr(self, "_reduced", False):
            for t in (self.sum, self.abs_sum, self.sq_sum) + ((self.gram,) if self.gram is not None else ()):
                distributed.all_reduce_sum(t)
            self.tokens = int(distributed.all_reduce_numbers(self.tokens)[0])
            self._reduced = True

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        n = max(self.tokens, 1)
        mean = self.sum / n
        return (self.sq_sum / n - mean * mean).clamp_min(0).float()

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)


def channel_scores(criterion: str, stats: ChannelStats, consumer: torch.Tensor) -> torch.Tensor:
    """Importance of each input channel of the consuming projection ``consumer`` (out, C).

    activation (Minitron): mean |x_c| of the channel on calibration data.
    fluctuation (FLAP): variance of x_c times the squared norm of the column that reads it: the output variance
        the channel causes, which a bias cannot restore.
    magnitude: the column's L2 norm (no data).
    """
    column_sq = consumer.float().pow(2).sum(0)
    if criterion == "activation":
        return stats.mean_abs
    if criterion == "fluctuation":
        return stats.variance * column_sq
    if criterion == "magnitude":
        return column_sq.sqrt()
    raise ValueError(criterion)


def group_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Sum of the scores of each run of ``group`` consecutive channels (a head's head_dim outputs, or a KV group's
    heads)."""
    return scores.reshape(-1, group).sum(1)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order (ties broken by position)."""
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values


def expand_groups(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Channel indices of the kept groups of ``size`` consecutive channels."""
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).reshape(-1)


def bias_shift(consumer: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: the removed channels' mean contribution to the consumer's output, W[:, R] E[x_R], added
    to its bias so the output keeps its mean."""
    return consumer.float()[:, removed] @ mean[removed]


def least_squares_refit(
    consumer: torch.Tensor, second_moment: torch.Tensor, kept: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The kept columns W' minimizing E||W x - W' x_S||^2 over the calibration tokens: W' = W G[:, S] G[S, S]^-1
    (G = E[x x^T]), the diagonal of G[S, S] dampened by ``damp`` times its mean. Float64 solve."""
    g = second_moment.double()
    gss = g[kept][:, kept]
    gss = gss + torch.eye(len(kept), dtype=g.dtype, device=g.device) * damp * gss.diagonal().mean().clamp_min(1e-12)
    rhs = consumer.double() @ g[:, kept]  # (out, k)
    solution = torch.linalg.solve(gss, rhs.t()).t()  # gss symmetric: (rhs gss^-1)^T = gss^-1 rhs^T
    return solution.to(torch.float32)


def relative_error(weight: torch.Tensor, new: torch.Tensor, G: torch.Tensor, keep: torch.Tensor) -> float:
    """E||W x - W' x_S||^2 / E||W x||^2 from the second moment G (no activations kept)."""
    G = G.double()
    W, N = weight.double(), new.double()
    full = torch.einsum("oi,ij,oj->", W, G, W)
    cross = torch.einsum("oi,ij,oj->", W, G[:, keep], N)
    kept = torch.einsum("oi,ij,oj->", N, G[keep][:, keep], N)
    return float((full - 2 * cross + kept) / full.clamp_min(1e-30))


def refit_summary(errors: list[dict]) -> dict:
    """How many refits were kept and the mean relative error of plain slicing and of what was kept."""
    return {
        "refit_kept": sum(e["kept"] for e in errors),
        "plain_mean": round(sum(e["plain"] for e in errors) / len(errors), 6),
        "refit_mean": round(sum(min(e["refit"], e["plain"]) for e in errors) / len(errors), 6),
    }


def refit_kept_columns(
    weight: torch.Tensor, second_moment: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor | None, dict]:
    """The least-squares refit of ``weight``'s kept columns and the relative output errors of plain slicing and of
    the refit on the calibration data; the refit is None where it is not better (never worse than slicing)."""
    new = least_squares_refit(weight, second_moment, keep)
    error = {
        "plain": relative_error(weight, weight[:, keep], second_moment, keep),
        "refit": relative_error(weight, new, second_moment, keep),
    }
    error["kept"] = error["refit"] < error["plain"]
    return (new if error["kept"] else None), error
