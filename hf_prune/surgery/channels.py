"""Cutting channels out of a block's projections in place, and rebuilding the model as a class that saves and
reloads: the family's own config with smaller widths (uniform), or hf_prune's modeling file (per-block widths)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import LinearRef, is_transposed, weight_out_in
from .rebuild import rebuild_model, updated_config


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


def rebuild_plain(model: nn.Module, updates: dict[str, Any], edit_state=None) -> nn.Module:
    """The model as its own class under a config with ``updates`` (smaller widths, bias flags), through the one
    surgery path. Biases the new config adds and the old model lacked (a bias flag also covers sibling projections)
    are zeros, beside their weight (same dtype and device). ``edit_state`` edits the state dict before the load
    (the hidden-channel cut)."""
    new_config = updated_config(model.config, updates)

    def zero_bias(owner: nn.Module, leaf: str) -> torch.Tensor:
        weight = owner.weight
        return torch.zeros(owner.out_features, dtype=weight.dtype, device=weight.device)

    return rebuild_model(
        model,
        lambda: type(model)(new_config),
        "width",
        allow_missing=lambda key: key.endswith(".bias"),
        fill_missing=zero_bias,
        edit_state=edit_state,
    )
