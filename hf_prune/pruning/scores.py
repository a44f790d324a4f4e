"""Wanda's importance score, pure tensor math."""

import torch

from .masks import row_slabs

SCORE_ELEMENTS = 1 << 22  # scores made per slab of rows: 16 MiB of float32 (and a selection's indices) at a time


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float32 for an (out, in) weight of any float dtype and the per-input-channel L2 norms of
    the calibration inputs (one float32 temporary: the product is taken in place)."""
    return weight.abs().float().mul_(input_norms.float().unsqueeze(0))


def wanda_score_slabs(weight: torch.Tensor, input_norms: torch.Tensor):
    """(rows, their scores) for consecutive slabs of about ``SCORE_ELEMENTS`` entries: the scores of a big matrix
    are never all in memory at once."""
    for rows in row_slabs(tuple(weight.shape), SCORE_ELEMENTS):
        yield rows, wanda_scores(weight[rows], input_norms)
