"""The block-by-block engine reproduces the model's own forward, block inputs and per-layer kwargs included."""

import pytest
import torch

from hf_prune.adapters import ModelAdapter
from hf_prune.calibration.engine import BlockwiseEngine

from .conftest import FAMILIES, make_tiny_model


def _last_block_output(model, adapter, ids):
    captured = {}

    def hook(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.blocks[-1].register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return captured["out"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [4, 2])
def test_walk_reproduces_the_models_forward(family, batch_size):
    # seqlen 48 > Gemma 3's sliding window of 16: the per-layer masks must be the right ones for each block.
    model = make_tiny_model(family, layers=4)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    engine = BlockwiseEngine.from_input_ids(model, adapter, ids, batch_size=batch_size)
    assert engine.num_chunks == 4 // batch_size
    visited = engine.run(lambda step: None)
    expected = _last_block_output(model, adapter, ids)
    torch.testing.assert_close(torch.cat(visited), expected, rtol=1e-5, atol=1e-5)


def test_capture_stops_before_the_head_and_restores_blocks():
    model = make_tiny_model("llama", layers=2)
    adapter = ModelAdapter(model)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    engine = BlockwiseEngine.from_input_ids(model, adapter, torch.ones(2, 8, dtype=torch.long), batch_size=2)
    engine.capture()
    handle.remove()
    assert calls == []
    assert all("forward" not in block.__dict__ for block in adapter.blocks)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits).all()


def test_gemma3_blocks_receive_their_own_layer_type_kwargs():
    model = make_tiny_model("gemma3_text", layers=2)
    adapter = ModelAdapter(model)
    engine = BlockwiseEngine.from_input_ids(model, adapter, torch.ones(1, 40, dtype=torch.long), batch_size=1)
    engine.capture()
    pe0 = engine._calls[0][0].kwargs["position_embeddings"]
    pe1 = engine._calls[1][0].kwargs["position_embeddings"]
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert not torch.equal(pe0[0], pe1[0])  # local vs global rotary base
