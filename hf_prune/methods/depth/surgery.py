"""Physically remove decoder blocks and keep the config consistent, so the result is a plain HF model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...adapters import ModelAdapter

# Top-level config lists that are not per-layer even if their length happens to equal the number of blocks.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"}
# Integer thresholds counted in layers: the first N blocks behave differently.
_LAYER_COUNT_THRESHOLDS = ("max_window_layers", "first_k_dense_replace")


def text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def remove_blocks(model: nn.Module, adapter: ModelAdapter, remove: list[int]) -> dict[str, Any]:
    """Delete blocks ``remove`` (original indices) in place; return what changed in the config.

    The ModuleList is rebuilt, every remaining module's ``layer_idx`` renumbered, and the config updated:
    ``num_hidden_layers``, every per-layer list (e.g. Gemma 3's ``layer_types``), and layer-count thresholds
    (e.g. ``max_window_layers``).
    """
    old = adapter.num_blocks
    drop = set(remove)
    keep = [i for i in range(old) if i not in drop]
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = adapter.blocks
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index

    config = text_config(model)
    changes: dict[str, Any] = {"num_hidden_layers": [old, len(keep)]}
    config.num_hidden_layers = len(keep)
    for key, value in list(vars(config).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == old:
            setattr(config, key, type(value)(value[i] for i in keep))
            changes[key] = "filtered to the kept blocks"
    for key in _LAYER_COUNT_THRESHOLDS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= old:
            new_value = sum(1 for i in keep if i < value)
            setattr(config, key, new_value)
            changes[key] = [value, new_value]
    if config is not model.config and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = len(keep)
    return changes
