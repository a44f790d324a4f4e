"""Distillation losses, pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the temperature-softened distributions, averaged over tokens."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits and their token ids, per position (what the disk cache keeps)."""
    values, indices = torch.topk(teacher_logits.float(), k, dim=-1)
    return values, indices.to(torch.int32)


def kd_loss_topk(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL on the teacher's top-k tokens: both distributions renormalized over those k tokens (zero when the student
    equals the teacher), T^2-scaled and averaged over tokens."""
    k = top_values.shape[-1]
    s = student_logits.float().gather(-1, top_indices.long()).reshape(-1, k) / temperature
    t = top_values.float().reshape(-1, k) / temperature
    return (
        F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * temperature**2
    )


def hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over blocks of the mean squared difference of hidden states, each relative to the teacher's mean square
    (so blocks with large residual streams do not dominate)."""
    losses = [
        (s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
        for s, t in zip(student, teacher)
    ]
    return torch.stack(losses).mean()
