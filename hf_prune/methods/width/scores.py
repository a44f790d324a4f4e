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

    def take_second_moment(self, device: torch.device | None = None) -> torch.Tensor:
        """The second moment, divided in place: the statistics give it up, so one channels^2 matrix is alive."""
        gram, self.gram = self.gram, None
        return gram.to(device if device is not None else gram.device).div_(max(self.tokens, 1))


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


def _solve_spd(gss: torch.Tensor, rhs_t: torch.Tensor) -> torch.Tensor:
    """gss^-1 rhs_t for a symmetric positive definite gss: Cholesky in the inputs' dtype (float32), a float64 solve
    only where the factorization fails."""
    factor, info = torch.linalg.cholesky_ex(gss)
    if int(info) == 0:
        out = torch.cholesky_solve(rhs_t, factor)
        if bool(torch.isfinite(out).all()):
            return out
    return torch.linalg.solve(gss.double(), rhs_t.double()).to(rhs_t.dtype)


def _damping(gss: torch.Tensor, damp: float) -> float:
    return damp * float(gss.diagonal().mean().clamp_min(1e-12))


def least_squares_refit(
    consumer: torch.Tensor, second_moment: torch.Tensor, kept: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The kept columns W' minimizing E||W x - W' x_S||^2 over the calibration tokens: W' = W G[:, S] G[S, S]^-1
    (G = E[x x^T]), the diagonal of G[S, S] dampened by ``damp`` times its mean. Float32 Cholesky solve."""
    g = second_moment.float()
    rhs = consumer.float() @ g[:, kept]  # (out, k)
    gss = g[kept.unsqueeze(1), kept.unsqueeze(0)]
    gss.diagonal().add_(_damping(gss, damp))
    return _solve_spd(gss, rhs.t().contiguous()).t()


def refit_summary(errors: list[dict]) -> dict:
    """How many refits were kept and the mean relative error of plain slicing and of what was kept."""
    return {
        "refit_kept": sum(e["kept"] for e in errors),
        "plain_mean": round(sum(e["plain"] for e in errors) / len(errors), 6),
        "refit_mean": round(sum(min(e["refit"], e["plain"]) for e in errors) / len(errors), 6),
    }


def refit_kept_columns(
    weight: torch.Tensor, second_moment: torch.Tensor, keep: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor | None, dict]:
    """The least-squares refit of ``weight``'s kept columns and the relative output errors of plain slicing and of
    the refit on the calibration data; the refit is None where it is not better (never worse than slicing).

    One (out x in x in) product, W G, serves the right-hand side and both errors; the refit's own term comes from the
    normal equations (N (G_SS + lambda I) = (W G)_S), so the only other products are k x k: float32 throughout
    (sums in float64), as on an accelerator. Pass the second moment as the only reference to it (e.g.
    ``stats.take_second_moment()``): it is let go once G_SS is taken."""
    W, G = weight.float(), second_moment.float()
    del second_moment
    WG = W @ G
    full = (W * WG).sum(dtype=torch.float64).clamp_min(1e-30)
    rhs = WG[:, keep]  # W G[:, S] (G symmetric)
    del WG
    gss = G[keep.unsqueeze(1), keep.unsqueeze(0)]  # G_SS, without a k x n intermediate
    del G
    plain = W[:, keep]
    plain_error = full - 2 * (plain * rhs).sum(dtype=torch.float64) + (plain * (plain @ gss)).sum(dtype=torch.float64)
    del plain
    lam = _damping(gss, damp)
    gss.diagonal().add_(lam)
    new = _solve_spd(gss, rhs.t().contiguous()).t()
    del gss
    refit_error = full - 2 * (new * rhs).sum(dtype=torch.float64) + (new * (rhs - lam * new)).sum(dtype=torch.float64)
    error = {"plain": float(plain_error / full), "refit": float(refit_error / full)}
    error["kept"] = error["refit"] < error["plain"]
    return (new.contiguous() if error["kept"] else None), error
