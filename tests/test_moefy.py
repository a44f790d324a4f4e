"""The MoE built from the real SmolLM2 weights: exact with every expert on, and a fitted router with fewer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from hf_prune.moefy import balanced_kmeans, moefy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path).eval()


def test_all_experts_with_a_zero_router_reproduce_the_dense_model(smollm2, tokenizer):
    ids = tokenizer("The capital of France is Paris, and the capital of Germany is", return_tensors="pt").input_ids
    groups = [torch.randperm(1536, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    moe = moefy(smollm2, num_experts=8, top_k=8, groups=groups)  # any neuron grouping: sums are order-free
    assert isinstance(moe, MixtralForCausalLM) and moe.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 384, 576)
    with torch.no_grad():
        dense, split = smollm2(ids).logits, moe(ids).logits
    torch.testing.assert_close(split, dense, rtol=0, atol=2e-4)  # the same sums in another order
    assert torch.equal(split.argmax(-1), dense.argmax(-1))
    with torch.no_grad():  # fewer experts per token than there are: no longer the dense model
        assert not torch.allclose(moefy(smollm2, 8, 6, groups=groups)(ids).logits, dense, atol=1e-2)


def test_balanced_kmeans_groups_equal_sizes_and_finds_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    members = torch.arange(64) % 4  # 4 planted clusters of 16
    base = torch.randn(4, 32, generator=generator)
    features = base[members] + 0.05 * torch.randn(64, 32, generator=generator)
    perm = balanced_kmeans(features @ features.t(), 4, generator)
    assert sorted(perm.tolist()) == list(range(64))
    for c in range(4):
        assert len(set(members[perm[c * 16 : (c + 1) * 16]].tolist())) == 1
