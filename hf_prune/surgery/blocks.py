"""Physically remove decoder blocks and keep the config consistent, so the result is a plain HF model.

Every per-layer structure of the config is renumbered: lists as long as the layers (``layer_types``,
``no_rope_layers``), lists of layer indices (``moe_layers``, ``mlp_only_layers``, LFM2's ``full_attn_idxs``),
counts of leading layers (``first_k_dense_replace``, ``max_window_layers``) and periodic patterns
(``decoder_sparse_step``, turned into an explicit ``mlp_only_layers``). ``structure_mismatch`` builds the model the
new config describes on the meta device and compares it block by block with the pruned one, so a family with a
per-layer structure not listed here is refused before any work instead of saving a checkpoint that reloads with
missing or unexpected keys.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..adapters import ModelAdapter
from .rebuild import parameter_shapes, skeleton

# Top-level config lists that are not per-layer even if their length happens to equal the number of blocks.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids"}
# Integer thresholds counted in layers: the first N blocks behave differently.
_LAYER_COUNT_THRESHOLDS = ("max_window_layers", "first_k_dense_replace")
# Lists of layer indices (not one entry per layer).
_LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers", "full_attn_idxs")  # LFM2: its attention blocks


def text_config_of(config):
    return getattr(config, "text_config", None) or config


def text_config(model: nn.Module):
    return text_config_of(model.config)


def _sparse_step_layers(config, old: int) -> list[int] | None:
    """Qwen-MoE's periodic pattern: layer i is MoE if i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    Returns the dense layers when the pattern is not every layer, else None."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step <= 1:
        return None
    only = set(getattr(config, "mlp_only_layers", None) or [])
    return [i for i in range(old) if i in only or (i + 1) % step != 0]


def renumber_config(config, old: int, keep: list[int]) -> dict[str, Any]:
    """Update ``config`` (the text config) in place for a model that keeps blocks ``keep`` of ``old``."""
    new_index = {i: n for n, i in enumerate(keep)}
    changes: dict[str, Any] = {"num_hidden_layers": [old, len(keep)]}
    dense = _sparse_step_layers(config, old)
    config.num_hidden_layers = len(keep)
    if dense is not None:
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [new_index[i] for i in dense if i in new_index]
        changes["decoder_sparse_step"] = "made explicit: mlp_only_layers lists the kept dense blocks"
    for key in _LAYER_INDEX_LISTS:
        value = getattr(config, key, None)
        if dense is not None and key == "mlp_only_layers":
            continue
        if isinstance(value, (list, tuple)) and value:
            setattr(config, key, type(value)(new_index[i] for i in value if i in new_index))
            changes[key] = "renumbered to the kept blocks"
    for key, value in list(vars(config).items()):
        if key in _NOT_PER_LAYER or key in _LAYER_INDEX_LISTS or key.startswith("_"):
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
    return changes


def remove_blocks(model: nn.Module, adapter: ModelAdapter, remove: list[int]) -> dict[str, Any]:
    """Delete blocks ``remove`` (original indices) in place; return what changed in the config.

    The ModuleList is rebuilt, every remaining module's ``layer_idx`` renumbered, and the config renumbered.
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
    changes = renumber_config(config, old, keep)
    if config is not model.config and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = len(keep)
    return changes


def structure_mismatch(model: nn.Module, adapter: ModelAdapter, remove: list[int] | None = None) -> str | None:
    """Build what the config describes (after removing blocks ``remove``, simulated on a copy of the config) and
    compare its blocks with the model's kept blocks; a description of the first difference, or None."""
    old = adapter.num_blocks
    keep = [i for i in range(old) if i not in set(remove or [])]
    config = copy.deepcopy(model.config)
    if remove:
        renumber_config(text_config_of(config), old, keep)
        if text_config_of(config) is not config and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(keep)
    skeleton_blocks = ModelAdapter(skeleton(model, config)).blocks
    if len(skeleton_blocks) != len(keep):
        return f"the config describes {len(skeleton_blocks)} blocks, the model keeps {len(keep)}"
    for new, original in enumerate(keep):
        want, have = parameter_shapes(skeleton_blocks[new]), parameter_shapes(adapter.blocks[original])
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:3]
            return f"block {original} (new index {new}) would reload differently: {diff}"
    return None
