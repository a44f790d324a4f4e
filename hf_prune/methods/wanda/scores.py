"""Wanda's importance score, pure tensor math."""

import torch


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for an (out, in) weight and the per-input-channel L2 norms of the calibration inputs."""
    return weight.abs() * input_norms.to(weight.dtype).unsqueeze(0)
