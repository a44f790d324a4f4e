"""PEFT adapters that cannot undo the sparsity: masked LoRA and SHiRA restricted to the surviving weights.

Masked LoRA: the update applied is (B @ A) * scaling, multiplied elementwise by the mask of non-zero base weights,
in the forward pass and in the merge, so a merged model has exactly the zeros of the pruned one.
SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", 2024): a sparse update on r * (in + out) fixed positions, here
drawn (seeded) among the surviving weights only, so the same holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class MaskedLoraLinear(LoraLinear):
    """PEFT's LoRA linear whose delta is masked to the base weight's non-zero entries."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        weight = self.get_base_layer().weight
        self.register_buffer("keep_mask", weight.detach() != 0, persistent=False)  # weight orientation

    def get_delta_weight(self, adapter) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        return delta * self.keep_mask.to(device=delta.device, dtype=delta.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            delta = self.get_delta_weight(adapter)
            h = self.lora_dropout[adapter](x.to(delta.dtype))
            # Conv1D (fan_in_fan_out) stores (in, out): h @ delta; nn.Linear stores (out, in): h @ delta.T
            update = h @ delta if self.fan_in_fan_out else F.linear(h, delta)
            result = result + update.to(result.dtype)
        return result


def surviving_weights_mask_fn(seed: int):
    """A SHiRA mask function: r * (in + out) positions drawn (seeded) among the non-zero base weights."""

    def mask_fn(base_layer, r, **kwargs):
        weight = base_layer.weight
        out_features, in_features = weight.shape
        alive = torch.nonzero(weight.detach().flatten() != 0).flatten().cpu()
        count = min(r * (in_features + out_features), alive.numel())
        gen = torch.Generator().manual_seed(seed)
        chosen = alive[torch.randperm(alive.numel(), generator=gen)[:count]]
        mask = torch.zeros(weight.numel(), dtype=weight.dtype)
        mask[chosen] = 1
        return mask.view_as(weight).to(weight.device)

    return mask_fn
