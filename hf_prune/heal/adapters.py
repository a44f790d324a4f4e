"""PEFT adapters that cannot undo the sparsity: masked LoRA and SHiRA restricted to the surviving weights.

Masked LoRA: the update applied is (B @ A) * scaling, multiplied elementwise by the mask of non-zero base weights,
in the forward pass and in the merge, so a merged model has exactly the zeros of the pruned one. The forward and
backward go through one autograd function that saves only x, A, B and the mask: the dense (out, in) delta exists
transiently for one linear at a time and is never kept for the backward (plain autograd would keep ~2x the weights'
size in float32 across the whole model).
SHiRA (Bhardwaj et al., "Sparse High Rank Adapters", 2024): a sparse update on r * (in + out) fixed positions, here
drawn (seeded) among the surviving weights only, so the same holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class MaskedLowRankUpdate(torch.autograd.Function):
    """y = x @ ((B @ A) * scaling * mask)^T with the delta recomputed in the backward instead of saved."""

    @staticmethod
    def forward(ctx, x, A, B, mask, scaling: float):
        delta = (B @ A).mul_(scaling).mul_(mask.to(A.dtype))
        ctx.save_for_backward(x, A, B, mask)
        ctx.scaling = scaling
        return F.linear(x, delta)

    @staticmethod
    def backward(ctx, grad):
        x, A, B, mask = ctx.saved_tensors
        weights = mask.to(A.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            delta = (B @ A).mul_(ctx.scaling).mul_(weights)
            grad_x = grad @ delta
            del delta
        g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # dL/d(delta): (out, in)
        g.mul_(weights).mul_(ctx.scaling)
        return grad_x, B.t() @ g, g @ A.t(), None, None


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
        # the mask in (out, in) orientation: Conv1D (fan_in_fan_out) stores its weight as (in, out)
        mask = self.keep_mask.t() if self.fan_in_fan_out else self.keep_mask
        for adapter in active:
            A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            h = self.lora_dropout[adapter](x.to(A.dtype))
            update = MaskedLowRankUpdate.apply(h, A, B, mask, float(self.scaling[adapter]))
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
