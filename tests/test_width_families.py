"""Width on families without a hand-written row: a family whose blocks have exactly a known layout gets its roles,
its width layout is derived from the config and checked on a meta-device skeleton; the others are refused before any
work with the reason."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.errors import UnsupportedModelError

from .conftest import TINY_WIDTHS, VOCAB

COMMON = dict(vocab_size=VOCAB, max_position_embeddings=1024, num_key_value_heads=2, **TINY_WIDTHS)
DERIVED = {"granite": "GraniteConfig", "seed_oss": "SeedOssConfig", "ernie4_5": "Ernie4_5Config", "olmo": "OlmoConfig"}
REFUSED = {"olmo2": "Olmo2Config", "starcoder2": "Starcoder2Config", "cohere": "CohereConfig"}
IDS = torch.randint(0, 3000, (1, 12), generator=torch.Generator().manual_seed(0))


def _tiny(config_name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(T, config_name)(**COMMON)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("family", list(DERIVED))
@pytest.mark.parametrize("axis", ["mlp", "heads"])
def test_a_family_with_a_known_layout_prunes_width_into_its_own_class(family, axis, tokenizer, tiny_recipe, tmp_path):
    model = _tiny(DERIVED[family])
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", axis: 0.5}))
    assert pruner.adapter.family == family and pruner.adapter.derived_from == "llama"
    pruner.prune()
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out")).eval()
    assert type(reloaded) is type(model)
    key = "intermediate_size" if axis == "mlp" else "num_key_value_heads"
    assert getattr(reloaded.config, key) == getattr(model.config, key) // 2
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits, atol=1e-5)
        gen = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(
            reloaded.generate(input_ids=IDS, **gen), reloaded.generate(input_ids=IDS, use_cache=False, **gen)
        )


@pytest.mark.parametrize("family", list(REFUSED))
def test_other_layouts_are_refused_before_any_work(family, tokenizer, tiny_recipe):
    model = _tiny(REFUSED[family])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="no layout hf_prune knows"):
        HFPruner(model, tokenizer, tiny_recipe({"method": "width", "mlp": 0.5})).prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_moe_model_whose_first_block_is_dense_keeps_its_experts():
    """The layout must hold in every block: GLM-4-MoE's dense first block does not make it a Llama."""
    from hf_prune.adapters import ModelAdapter

    config = T.Glm4MoeConfig(
        **COMMON, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = ModelAdapter(model)
    assert adapter.derived_from is None and adapter.moe_blocks() == [1, 2]
