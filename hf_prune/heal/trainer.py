"""Healing: short PEFT training of a pruned model that keeps its zeros, then an exact-sparsity merge."""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import ModelAdapter, is_transposed, zero_fraction
from ..calibration.data import load_documents, sample_windows
from ..calibration.engine import model_device
from ..errors import HFPruneError, PruningCheckError, RecipeError
from ..pruning.targets import select_targets
from ..utils import logger
from .config import HealConfig
from .distill import hidden_loss, kd_loss, kd_loss_topk, teacher_topk

CHECKPOINTING_ABOVE = 1_000_000_000  # gradient_checkpointing: auto turns it on past this many parameters

PRUNED_FRACTION_FOR_MASKS = 0.01  # linears with fewer exact zeros than this hold no pruning mask worth keeping


@dataclass
class HealResult:
    mask: str
    steps: int
    tokens: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    distill: bool = False
    merged: bool = True
    time_s: float = 0.0
    sparsity_preserved: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        first = sum(self.losses[:10]) / max(len(self.losses[:10]), 1)
        last = sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1)
        return {
            "mask": self.mask,
            "steps": self.steps,
            "tokens": self.tokens,
            "trainable_params": self.trainable_params,
            "loss_first10": round(first, 4),
            "loss_last10": round(last, 4),
            "distill": self.distill,
            "merged": self.merged,
            "time_s": round(self.time_s, 1),
            "sparsity_preserved": self.sparsity_preserved,
        }


def training_windows(tokenizer, cfg: HealConfig) -> torch.Tensor:
    """``max_steps * batch_size`` windows of ``seqlen`` tokens (fewer distinct ones, cycled, if the text is short)."""
    docs, used = load_documents(cfg.source, **cfg.source_kwargs())
    wanted = cfg.max_steps * cfg.batch_size
    windows = sample_windows(docs, tokenizer, wanted, cfg.seqlen, cfg.seed, allow_fewer=True)
    if len(windows) < wanted:
        logger.warning(
            "heal: %s holds %d distinct windows of %d tokens; cycling them for %d steps.",
            used,
            len(windows),
            cfg.seqlen,
            cfg.max_steps,
        )
        windows = windows.repeat((wanted + len(windows) - 1) // len(windows), 1)[:wanted]
    logger.info("heal: %d steps x %d x %d tokens of %s", cfg.max_steps, cfg.batch_size, cfg.seqlen, used)
    return windows


def _zero_masks(refs) -> dict[str, torch.Tensor]:
    return {r.name: (r.module.weight.detach() == 0).cpu() for r in refs}


def resolve_mask_mode(cfg: HealConfig, refs) -> str:
    zeros = zero_fraction(refs)
    pruned = zeros >= PRUNED_FRACTION_FOR_MASKS
    if cfg.mask == "auto":
        return "masked_lora" if pruned else "none"
    if cfg.mask in ("masked_lora", "shira") and not pruned:
        raise HFPruneError(
            f"heal.mask={cfg.mask!r} keeps a pruning mask, but the target linears hold only {zeros:.2%} "
            "zeros: this model has no weight pruning to keep. Prune first, or use mask: none (plain LoRA) for dense, "
            "depth- or width-pruned models."
        )
    return cfg.mask


def wrap_with_adapter(model: nn.Module, names: list[str], mode: str, cfg: HealConfig, conv1d: bool):
    try:
        from peft import LoraConfig, ShiraConfig, get_peft_model
    except ImportError as exc:
        raise HFPruneError("Healing needs PEFT: pip install 'hf-prune[heal]' (or pip install peft).") from exc

    from .adapters import MaskedLoraLinear, surviving_weights_mask_fn

    if mode == "shira":
        if conv1d:
            raise HFPruneError("heal.mask=shira supports nn.Linear layers only (not GPT-2's Conv1D); use masked_lora.")
        config = ShiraConfig(r=cfg.lora_r, target_modules=names, mask_type="random", random_seed=cfg.seed)
        config.mask_fn = surviving_weights_mask_fn(cfg.seed)
    else:
        config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=names,
            fan_in_fan_out=conv1d,
            bias="none",
        )
        if mode == "masked_lora":
            from transformers.pytorch_utils import Conv1D

            config._register_custom_module({nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})
    return get_peft_model(model, config)


def _autocast(cfg: HealConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def _lr_factor(step: int, cfg: HealConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _cache_teacher_topk(teacher: nn.Module, windows: torch.Tensor, cfg: HealConfig, folder: str) -> None:
    device = model_device(teacher)
    for step in tqdm(range(cfg.max_steps), desc="heal: teacher top-k to disk", leave=False):
        batch = windows[step * cfg.batch_size : (step + 1) * cfg.batch_size].to(device)
        values, indices = teacher_topk(teacher(input_ids=batch, use_cache=False).logits, cfg.cache_topk)
        torch.save({"values": values.cpu(), "indices": indices.cpu()}, f"{folder}/{step}.pt")


def check_hidden_match(student: nn.Module, teacher: nn.Module) -> None:
    """Hidden-state distillation pairs block i of the student with block i of the teacher: same count and width."""
    s, t = ModelAdapter(student), ModelAdapter(teacher)
    s_hidden, t_hidden = student.get_input_embeddings().weight.shape[1], teacher.get_input_embeddings().weight.shape[1]
    if s.num_blocks != t.num_blocks or s_hidden != t_hidden:
        raise RecipeError(
            f"heal.distill_hidden pairs the blocks of student and teacher, but the student has {s.num_blocks} blocks "
            f"of width {s_hidden} and the teacher {t.num_blocks} of width {t_hidden} (depth pruning and SliceGPT "
            "change them); use logits distillation only (distill_hidden: 0)."
        )


def heal_model(
    model: nn.Module, tokenizer, adapter: ModelAdapter, cfg: HealConfig, teacher: nn.Module | None = None
) -> tuple[nn.Module, HealResult, Any]:
    """Train an adapter on the pruned model; return (model, result, peft model if kept unmerged else None).

    With ``cfg.merge`` the returned model is the same object as ``model`` with the update merged, and its zeros are
    exactly the zeros it had before (checked; PruningCheckError otherwise).
    """
    start = time.perf_counter()
    refs = select_targets(adapter, cfg.targets, [], experts=False)
    mode = resolve_mask_mode(cfg, refs)
    if cfg.distill and teacher is None:
        raise HFPruneError("heal.distill needs the dense teacher model.")
    if cfg.distill_hidden:
        check_hidden_match(model, teacher)
    before = _zero_masks(refs) if mode != "none" else {}
    windows = training_windows(tokenizer, cfg)
    device = model_device(model)

    cache_dir = None
    if cfg.distill and cfg.teacher_cache == "disk":
        cache_dir = tempfile.mkdtemp(prefix="hf_prune_teacher_")
        _cache_teacher_topk(teacher, windows, cfg, cache_dir)
        teacher = None  # free it: training reads the cached top-k logits

    conv1d = any(is_transposed(r.module) for r in refs)
    peft_model = wrap_with_adapter(model, [r.name for r in refs], mode, cfg, conv1d)
    checkpointing = cfg.gradient_checkpointing
    if checkpointing == "auto":  # activations of a big model's every block would dwarf the adapter
        checkpointing = sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE
        if checkpointing:
            logger.info("heal: gradient checkpointing on (more than %.0e parameters)", CHECKPOINTING_ABOVE)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    result = HealResult(
        mode,
        cfg.max_steps,
        cfg.max_steps * cfg.batch_size * cfg.seqlen,
        trainable,
        distill=cfg.distill,
        merged=cfg.merge,
    )
    logger.info(
        "heal: %s on %d linears, %d trainable parameters%s",
        mode,
        len(refs),
        trainable,
        ", with distillation" if cfg.distill else "",
    )
    peft_model.train()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        bar = tqdm(range(cfg.max_steps), desc="heal", leave=False)
        for step in bar:
            batch = windows[step * cfg.batch_size : (step + 1) * cfg.batch_size].to(device)
            with _autocast(cfg, device):
                out = peft_model(input_ids=batch, use_cache=False, output_hidden_states=bool(cfg.distill_hidden))
            logits = out.logits
            lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            loss = lm
            if cfg.distill:
                if cache_dir is not None:
                    cached = torch.load(f"{cache_dir}/{step}.pt")
                    kd = kd_loss_topk(
                        logits, cached["values"].to(device), cached["indices"].to(device), cfg.temperature
                    )
                else:
                    with torch.no_grad():
                        target = teacher(
                            input_ids=batch, use_cache=False, output_hidden_states=bool(cfg.distill_hidden)
                        )
                    kd = kd_loss(logits, target.logits, cfg.temperature)
                loss = (1.0 - cfg.distill_alpha) * lm + cfg.distill_alpha * kd
                if cfg.distill_hidden:
                    loss = loss + cfg.distill_hidden * hidden_loss(out.hidden_states[1:], target.hidden_states[1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            result.losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if checkpointing:
            model.gradient_checkpointing_disable()
    peft_model.eval()

    if cfg.merge:
        model = peft_model.merge_and_unload()
        peft_model = None
        if before:
            after = _zero_masks(select_targets(ModelAdapter(model), cfg.targets, [], experts=False))
            lost = [n for n in before if bool((before[n] & ~after[n]).any())]
            if lost:
                raise PruningCheckError(f"heal: the merge filled pruned weights of {lost[:3]}; nothing is saved.")
            result.sparsity_preserved = True
    result.time_s = time.perf_counter() - start
    return model, result, peft_model
