"""The ``heal:`` section of a recipe (and the keyword arguments of ``HFPruner.heal``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configuration import StrictConfig, TextSourceFields
from ..errors import RecipeError

MASK_MODES = ("auto", "masked_lora", "shira", "none")


@dataclass
class HealConfig(TextSourceFields, StrictConfig):
    """Short PEFT training after pruning that keeps the sparsity.

    Args:
        max_steps, batch_size, seqlen: the training budget (steps x batch x seqlen tokens).
        lr, warmup_steps, weight_decay, grad_clip: AdamW with linear warm-up then cosine decay.
        lora_r, lora_alpha, lora_dropout: adapter size (SHiRA trains r * (in + out) weights per linear, as LoRA does).
        mask: ``auto`` (masked LoRA when the linears hold pruned zeros, plain LoRA otherwise, e.g. after depth or
            width pruning), ``masked_lora``, ``shira`` (sparse update on surviving weights) or ``none`` (plain LoRA:
            the merge makes the linears dense again).
        targets: roles or regexes of the block linears to adapt (default: all of them).
        source, text_field, split, dataset_config, data_files: training text (default: fortunes).
        seed: data order and SHiRA positions.
        distill: add knowledge distillation from the dense teacher (KL on logits at ``temperature``), weighted
            ``distill_alpha`` against the language-modelling loss. Default (unset): on after structured width
            pruning (``width``), where the teacher is known; off otherwise.
        distill_hidden: weight of a hidden-state loss besides the logits: the mean squared difference between the
            student's and the teacher's hidden states after every block, relative to the teacher's mean square.
            Needs the teacher's hidden size and block count (width pruning keeps both; depth and SliceGPT do not).
        teacher: the dense model (folder or Hub id); default the model the pruner was loaded from.
        teacher_cache: ``memory`` (teacher logits on the fly) or ``disk`` (teacher top-``cache_topk`` logits computed
            once, kept in a temporary folder; the teacher is freed before training).
        merge: merge the adapter into the weights (the checkpoint stays a plain HF model); False keeps it separate
            and ``save_pretrained`` writes it PEFT-style under ``adapter/``.
        gradient_checkpointing: trade compute for activation memory; ``auto`` (default): on for models of more than
            1B parameters.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32`` or ``bf16``.
    """

    max_steps: int = 200
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    mask: str = "auto"
    targets: list[str] | None = None
    seed: int = 0
    distill: bool | None = None
    distill_alpha: float = 0.5
    distill_hidden: float = 0.0
    temperature: float = 2.0
    teacher: str | None = None
    teacher_cache: str = "memory"
    cache_topk: int = 64
    merge: bool = True
    gradient_checkpointing: bool | str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        if self.gradient_checkpointing not in ("auto", True, False):
            raise RecipeError(
                f"heal.gradient_checkpointing must be auto, true or false, got {self.gradient_checkpointing!r}."
            )
        for key in ("max_steps", "batch_size", "lora_r", "cache_topk"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeError(f"heal.{key} must be a positive integer, got {value!r}.")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise RecipeError(f"heal.seqlen must be an integer >= 2, got {self.seqlen!r}.")
        if not self.lr > 0:
            raise RecipeError(f"heal.lr must be > 0, got {self.lr}.")
        if self.mask not in MASK_MODES:
            raise RecipeError(f"heal.mask must be one of {', '.join(MASK_MODES)}, got {self.mask!r}.")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise RecipeError(f"heal.distill_alpha must be in [0, 1], got {self.distill_alpha}.")
        if self.distill is not None and not isinstance(self.distill, bool):
            raise RecipeError(f"heal.distill must be true or false, got {self.distill!r}.")
        if isinstance(self.distill_hidden, bool) or not isinstance(self.distill_hidden, (int, float)):
            raise RecipeError(f"heal.distill_hidden must be a number >= 0, got {self.distill_hidden!r}.")
        if self.distill_hidden < 0:
            raise RecipeError(f"heal.distill_hidden must be >= 0, got {self.distill_hidden}.")
        if self.distill_hidden and (self.distill is False or self.teacher_cache == "disk"):
            raise RecipeError(
                "heal.distill_hidden needs distillation from a teacher in memory: set distill: true and "
                "teacher_cache: memory (the disk cache keeps top-k logits only)."
            )
        if not self.temperature > 0:
            raise RecipeError(f"heal.temperature must be > 0, got {self.temperature}.")
        if self.teacher_cache not in ("memory", "disk"):
            raise RecipeError(f"heal.teacher_cache must be 'memory' or 'disk', got {self.teacher_cache!r}.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise RecipeError(f"heal.precision must be auto, fp32 or bf16, got {self.precision!r}.")
