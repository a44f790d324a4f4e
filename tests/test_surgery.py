"""The one surgery path: structural steps rebuild through the meta device with the kept tensors' own dtype and device,
never through a randomly initialised (float32) model on the host."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_prune import HFPruner

from .conftest import make_tiny_model

STEPS = {
    "width": {"method": "width", "mlp": 0.5, "heads": 0.5},
    "width-per-block": {"method": "width", "mlp": 0.5, "per_block": True},
    "slicegpt-shared": {"method": "slicegpt", "slicing": 0.25, "rotation": "shared"},
    "slicegpt-per-block": {"method": "slicegpt", "slicing": 0.25},
    "depth": {"method": "depth", "num_blocks": 1},
    "shrink": {"method": "shrink", "params": 0.99, "eval_nsamples": 2},
}


@pytest.mark.parametrize("name", list(STEPS))
def test_structural_steps_on_bf16_never_build_a_model_off_the_meta_device(name, tokenizer, tiny_recipe, monkeypatch):
    built = []
    original = transformers.PreTrainedModel.__init__

    def record(self, *args, **kwargs):
        built.append((type(self).__name__, torch.empty(0).device.type))
        original(self, *args, **kwargs)

    model = make_tiny_model("llama").to(torch.bfloat16)
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", record)
    pruner = HFPruner(model, tokenizer, tiny_recipe(STEPS[name]))
    pruner.prune()
    assert all(device == "meta" for _, device in built), built
    if name != "depth":
        assert built, "the step rebuilt nothing"
    assert all(p.dtype == torch.bfloat16 for p in pruner.model.parameters() if p.is_floating_point())
