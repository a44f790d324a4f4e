"""Cutting channels out of a block's projections in place, and rebuilding the model as a class that saves and
reloads: the family's own config with smaller widths (uniform), or hf_prune's modeling file (per-block widths)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...adapters import LinearRef, is_transposed, weight_out_in


def set_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a linear (nn.Linear or GPT-2's Conv1D) a new (out, in) weight and bias, keeping its dtype."""
    dtype, device = module.weight.dtype, module.weight.device
    stored = weight.t() if is_transposed(module) else weight
    module.weight = nn.Parameter(stored.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    out_features, in_features = weight.shape
    if is_transposed(module):
        module.nf = out_features
    else:
        module.in_features, module.out_features = in_features, out_features


def keep_outputs(ref: LinearRef, rows: torch.Tensor) -> None:
    """A producer keeps the output channels ``rows`` (and their biases)."""
    w = weight_out_in(ref.module)
    bias = ref.module.bias
    set_linear(ref.module, w[rows], bias.data[rows] if bias is not None else None)


def keep_inputs(ref: LinearRef, columns: torch.Tensor, new_weight: torch.Tensor | None, shift: torch.Tensor | None):
    """The consumer keeps the input channels ``columns`` (or takes ``new_weight``, already (out, len(columns))) and
    adds ``shift`` to its bias (created when it has none)."""
    module = ref.module
    weight = new_weight if new_weight is not None else weight_out_in(module)[:, columns]
    bias = module.bias.data.float() if module.bias is not None else None
    if shift is not None:
        bias = shift if bias is None else bias + shift
    set_linear(module, weight, bias)


def rebuild_plain(model: nn.Module, updates: dict[str, Any]) -> nn.Module:
    """The model as its own class under a config with ``updates`` (smaller widths, bias flags), weights moved over.
    Biases the new config adds and the old model lacked (a bias flag also covers sibling projections) are zeros."""
    config = model.config
    new_config = type(config).from_dict({**config.to_dict(), **updates})
    state = model.state_dict()
    with torch.device("meta"):
        new_model = type(model)(new_config)
    missing, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    bad = [k for k in missing if not k.endswith(".bias")]
    if bad or unexpected:
        raise RuntimeError(f"width: the rebuilt model does not match: missing {bad[:5]}, unexpected {unexpected[:5]}")
    ref = next(model.parameters())
    for name in missing:
        owner, _, leaf = name.rpartition(".")
        module = new_model.get_submodule(owner)
        setattr(module, leaf, nn.Parameter(torch.zeros(module.out_features, dtype=ref.dtype, device=ref.device)))
    _materialize_buffers(new_model, model)
    if getattr(config, "tie_word_embeddings", False):
        new_model.tie_weights()
    new_model.eval()
    for attr in ("pruning_config",):
        if hasattr(config, attr):
            setattr(new_model.config, attr, getattr(config, attr))
    new_model.name_or_path = getattr(model, "name_or_path", "")
    new_model.generation_config = model.generation_config
    return new_model


def _materialize_buffers(new_model: nn.Module, old_model: nn.Module) -> None:
    """Non-persistent buffers (rotary tables) are not in the state dict: take them from the old model."""
    old = dict(old_model.named_buffers())
    for name, buf in list(new_model.named_buffers()):
        if buf.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            module = new_model.get_submodule(owner) if owner else new_model
            module._buffers[leaf] = old[name].clone() if name in old else torch.zeros_like(buf, device="cpu")
