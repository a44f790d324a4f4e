"""Healing after pruning with PEFT adapters that keep the sparsity (masked LoRA, SHiRA), optional distillation."""

from .config import HealConfig
from .distill import kd_loss, kd_loss_topk
from .persist import load_healing_adapter
from .trainer import HealResult, heal_model

__all__ = ["HealConfig", "HealResult", "heal_model", "kd_loss", "kd_loss_topk", "load_healing_adapter"]
