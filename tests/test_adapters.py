"""Adapters find blocks and linears in every supported family, as data; unknown families fail clearly."""

import pytest
import torch
from torch import nn
from transformers import BloomConfig, BloomForCausalLM, PretrainedConfig, PreTrainedModel

from hf_prune.adapters import FAMILIES, ModelAdapter, in_features, weight_out_in
from hf_prune.errors import UnsupportedModelError

from .conftest import FAMILIES as TESTED
from .conftest import make_tiny_model

EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen3": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma3_text": {"q", "k", "v", "o", "gate", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "opt": {"q", "k", "v", "o", "up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
}


@pytest.mark.parametrize("family", TESTED)
def test_table_adapter_finds_blocks_and_roles(family):
    model = make_tiny_model(family, layers=3)
    adapter = ModelAdapter(model)
    assert adapter.family == family and family in FAMILIES
    assert adapter.num_blocks == 3
    for i in range(3):
        refs = adapter.linears(i)
        assert {r.role for r in refs} == EXPECTED_ROLES[family]
        assert all(r.name.startswith(adapter.block_name(i) + ".") for r in refs)
    # Every linear of every block is covered, nothing outside the blocks (lm_head, embeddings) is.
    all_block_linears = {
        n
        for n, m in model.named_modules()
        if n.startswith(adapter.blocks_path + ".")
        and hasattr(m, "weight")
        and m.weight is not None
        and m.weight.dim() == 2
    }
    assert {r.name for r in adapter.all_linears()} == all_block_linears


def test_gpt2_conv1d_weight_is_viewed_out_by_in():
    model = make_tiny_model("gpt2", layers=1)
    ref = next(r for r in ModelAdapter(model).linears(0) if r.role == "up")
    assert tuple(ref.module.weight.shape) == (64, 256)  # Conv1D stores (in, out)
    w = weight_out_in(ref.module)
    assert tuple(w.shape) == (256, 64) and in_features(ref.module) == 64
    w[3, 5] = 0.0  # a view: writes reach the parameter
    assert ref.module.weight[5, 3] == 0.0


def test_family_outside_table_falls_back_to_no_split_modules():
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    model = BloomForCausalLM(config).eval()
    assert config.model_type not in FAMILIES
    adapter = ModelAdapter(model)
    assert adapter.family.startswith("fallback:") and adapter.blocks_path == "transformer.h"
    assert adapter.num_blocks == 2 and len(adapter.linears(0)) >= 3


class _OddConfig(PretrainedConfig):
    model_type = "odd_family"


class _OddModel(PreTrainedModel):
    config_class = _OddConfig

    def __init__(self, config):
        super().__init__(config)
        self.stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def test_unknown_family_without_no_split_modules_names_supported_families():
    with pytest.raises(UnsupportedModelError) as err:
        ModelAdapter(_OddModel(_OddConfig()))
    msg = str(err.value)
    assert "odd_family" in msg and "llama" in msg and "gpt2" in msg and "table.py" in msg
