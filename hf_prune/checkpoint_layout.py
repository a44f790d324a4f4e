"""Checkpoint layout vs model layout, with transformers' own conversion mapping.

transformers 5 keeps some weights in memory in another layout than on disk: MoE experts are fused 3-D tensors in
the model (``mlp.experts.gate_up_proj``) but per-expert linears in the files (``mlp.experts.0.gate_proj.weight``),
converted by ``from_pretrained`` and reverted by ``save_pretrained``. Code that reads or writes checkpoint tensors
itself (streaming) goes through these two functions so it sees what the model sees and writes what
``save_pretrained`` writes.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


def to_model_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (any subset, e.g. one block's) renamed and merged into the model's parameter names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    conversions = get_model_conversion_mapping(model)
    if not conversions:
        return tensors
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, object] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = apply_converters(apply_renamings(key, renamings), converters)
        if pattern is None:
            pending[renamed] = WeightRenaming(key, renamed)
            pattern = key
        else:
            pending.setdefault(renamed, deepcopy(by_pattern[pattern]))
        pending[renamed].add_tensor(renamed, key, pattern, tensor)
    out: dict[str, torch.Tensor] = {}
    for name, conversion in pending.items():
        for target, value in conversion.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model tensors in the layout ``save_pretrained`` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)
