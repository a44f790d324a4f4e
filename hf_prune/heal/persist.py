"""Keeping a healing adapter unmerged: saved PEFT-style under ``adapter/`` next to the pruned base checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"
HEAL_META = "hf_prune_heal.json"


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights with PEFT's injected layers taken out (``x.base_layer.weight`` -> ``x.weight``)."""
    out = {}
    for key, value in model.state_dict().items():
        if any(tag in key for tag in ("lora_", "shira_")):
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_adapter(peft_model, folder: str | os.PathLike, mask: str, seed: int) -> None:
    target = Path(folder) / ADAPTER_DIR
    peft_model.save_pretrained(str(target))
    (target / HEAL_META).write_text(json.dumps({"mask": mask, "seed": seed}, indent=2) + "\n")


def load_healing_adapter(model: nn.Module, folder: str | os.PathLike):
    """Attach a saved hf_prune healing adapter (``<folder>/adapter`` or the adapter folder itself) to ``model``.

    Masked LoRA and SHiRA-on-surviving-weights need hf_prune's layer classes to stay sparse; plain PEFT would load
    them as ordinary (dense) adapters, so load them here.
    """
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers.pytorch_utils import Conv1D

    from .adapters import MaskedLoraLinear, surviving_weights_mask_fn

    path = Path(folder)
    if (path / ADAPTER_DIR).is_dir():
        path = path / ADAPTER_DIR
    meta = json.loads((path / HEAL_META).read_text()) if (path / HEAL_META).exists() else {"mask": "none"}
    config = PeftConfig.from_pretrained(str(path))
    if meta["mask"] == "masked_lora" and isinstance(config, LoraConfig):
        config._register_custom_module({nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})
    elif meta["mask"] == "shira":
        config.mask_fn = surviving_weights_mask_fn(meta.get("seed", 0))
    return PeftModel.from_pretrained(model, str(path), config=config)
