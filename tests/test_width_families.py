"""Width on families without a hand-written row: a family whose blocks have exactly one of the known layouts (an MLP
layout with a placement of the block's norms) gets its roles, its width layout is derived from the config and checked
on a meta-device skeleton; what its config cannot express is refused before any work with the reason."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.errors import RecipeError, UnsupportedModelError

from .conftest import TINY_WIDTHS, VOCAB

COMMON = dict(vocab_size=VOCAB, max_position_embeddings=1024, num_key_value_heads=2, **TINY_WIDTHS)
CANNOT_DESCRIBE = "config cannot describe the narrowed model"
NOT_RMS = "is not an RMS norm"
OVER_EVERY_HEAD = "normalizes all 64 channels of every head"
# family -> (config class, its extra config values, the layout found, {axis: the refusal}: every other axis prunes)
DERIVED = {
    "granite": ("GraniteConfig", {}, "gated/pre-norm", {}),
    "seed_oss": ("SeedOssConfig", {}, "gated/pre-norm", {}),
    "ernie4_5": ("Ernie4_5Config", {}, "gated/pre-norm", {}),
    "internlm3": ("InternLM3Config", {}, "gated/pre-norm", {}),
    "smollm3": ("SmolLM3Config", {"pad_token_id": 0}, "gated/pre-norm", {}),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", {"head_dim": 16}, "gated/pre-norm", {}),
    "olmo": ("OlmoConfig", {}, "gated/pre-norm", {"hidden": "has no weight per stream channel"}),
    "olmo2": ("Olmo2Config", {}, "gated/post-norm", {"heads": OVER_EVERY_HEAD}),
    "olmo3": ("Olmo3Config", {}, "gated/post-norm", {"heads": OVER_EVERY_HEAD}),
    "exaone4": ("Exaone4Config", {}, "gated/post-norm", {}),
    "cohere": ("CohereConfig", {}, "gated/parallel", {"hidden": NOT_RMS}),
    "starcoder2": ("Starcoder2Config", {}, "fc/pre-norm", {"hidden": NOT_RMS}),
    "apertus": ("ApertusConfig", {}, "gateless/named-pre-norm", {}),
    "arcee": ("ArceeConfig", {}, "gateless/pre-norm", {}),
    "nemotron": ("NemotronConfig", {}, "gateless/pre-norm", {"hidden": NOT_RMS}),
    "glm": ("GlmConfig", {"pad_token_id": 0}, "fused-gate-up/pre-norm", {}),
    "glm4": ("Glm4Config", {"pad_token_id": 0}, "fused-gate-up/glm4-sandwich", {}),
    "stablelm": ("StableLmConfig", {}, "gated/pre-norm", {"heads": CANNOT_DESCRIBE, "hidden": NOT_RMS}),
    "helium": (
        "HeliumConfig",
        {"head_dim": 16},
        "gated/pre-norm",
        {"heads": CANNOT_DESCRIBE, "hidden": CANNOT_DESCRIBE},
    ),
    "bitnet": (  # norms inside its attention and MLP, over the heads' and the neurons' channels
        "BitNetConfig",
        {},
        "gated/pre-norm",
        {"mlp": CANNOT_DESCRIBE, "heads": OVER_EVERY_HEAD, "hidden": CANNOT_DESCRIBE},
    ),
}
AMOUNT = {"mlp": 0.5, "heads": 0.5, "hidden": 0.25}
KEY = {"mlp": "intermediate_size", "heads": "num_key_value_heads", "hidden": "hidden_size"}
IDS = torch.randint(0, 3000, (1, 12), generator=torch.Generator().manual_seed(0))


def _tiny(config_name: str, extra: dict | None = None, **common):
    torch.manual_seed(0)
    config = getattr(T, config_name)(**(common or COMMON), **(extra or {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.2)
    return model


def _refused_before_any_work(pruner, model, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=match):
        pruner.prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _reloads_alike(pruner, model, folder):
    """The saved folder reloads as the family's own class, to the pruned model's logits; cached = uncached."""
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(folder)).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits, atol=1e-5)
        gen = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(
            reloaded.generate(input_ids=IDS, **gen), reloaded.generate(input_ids=IDS, use_cache=False, **gen)
        )
    return reloaded


@pytest.mark.parametrize("family", list(DERIVED))
@pytest.mark.parametrize("axis", ["mlp", "heads", "hidden"])
def test_a_family_with_a_known_layout_prunes_width_into_its_own_class_or_refuses_first(
    family, axis, tokenizer, tiny_recipe, tmp_path
):
    config_name, extra, layout, refused = DERIVED[family]
    model = _tiny(config_name, extra)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", axis: AMOUNT[axis]}))
    assert pruner.adapter.family == family and pruner.adapter.derived_from == layout
    if axis in refused:
        _refused_before_any_work(pruner, model, refused[axis])
        return
    pruner.prune()
    reloaded = _reloads_alike(pruner, model, tmp_path / "out")
    assert getattr(reloaded.config, KEY[axis]) < getattr(model.config, KEY[axis])


FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=3)
HEAD_DIM_FROM_HIDDEN = "derives head_dim from hidden_size"
# families with their own table rows beyond the common layouts: (config class, config values, {axis: the refusal})
OWN_ROWS = {
    "falcon-7b": ("FalconConfig", FALCON, {"heads": HEAD_DIM_FROM_HIDDEN, "hidden": HEAD_DIM_FROM_HIDDEN}),
    "falcon-40b": (  # grouped fused q/k/v, two parallel norms
        "FalconConfig",
        {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2},
        {"heads": HEAD_DIM_FROM_HIDDEN, "hidden": HEAD_DIM_FROM_HIDDEN},
    ),
    "lfm2": (  # convolution and attention blocks; the convolutions' channels are hidden_size wide
        "Lfm2Config",
        {
            **COMMON,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
            "full_attn_idxs": [1, 3],  # real LFM2 configs carry both
        },
        {"hidden": "conv.conv.weight would be"},
    ),
}
DOWN = {"falcon": "mlp.dense_4h_to_h", "lfm2": "feed_forward.w2"}


@pytest.mark.parametrize("name", list(OWN_ROWS))
@pytest.mark.parametrize("axis", ["mlp", "heads", "hidden"])
def test_falcon_and_lfm2_prune_width_or_refuse_first(name, axis, tokenizer, tiny_recipe, tmp_path):
    config_name, values, refused = OWN_ROWS[name]
    model = _tiny(config_name, **values)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", axis: AMOUNT[axis]}))
    assert pruner.adapter.family == model.config.model_type
    if axis in refused:
        _refused_before_any_work(pruner, model, refused[axis])
        return

    def width(m):  # MLP neurons as built (LFM2 derives them from intermediate_size unless told not to), KV heads
        if axis == "mlp":
            return m.get_submodule(f"{pruner.adapter.blocks_path}.1.{DOWN[m.config.model_type]}").in_features
        return m.config.num_key_value_heads

    width_before = width(model)
    pruner.prune()
    assert width(_reloads_alike(pruner, model, tmp_path / "out")) < width_before


@pytest.mark.parametrize("name", list(OWN_ROWS))
def test_falcon_and_lfm2_remove_blocks_with_compensation(name, tokenizer, tiny_recipe, tmp_path):
    """Falcon adds the attention output into the MLP's output tensor in place: a map fitted on that tensor (not a
    copy taken when the MLP returns it) would see attention + MLP and the residual check would refuse the block.
    LFM2's convolution block 0 takes the map, its residual checked with the convolution as its token mixer."""
    config_name, values, _ = OWN_ROWS[name]
    model = _tiny(config_name, **values)
    layers = model.config.num_hidden_layers
    step = {"method": "depth", "blocks": [1], "compensate": "least_squares"}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune()
    (entry,) = report.steps[0].details["compensation"]
    writer = f"{pruner.adapter.blocks_path}.0.{DOWN[model.config.model_type]}"
    assert entry["writer"] == writer and entry["error_removed"] > 0
    config = _reloads_alike(pruner, model, tmp_path / "out").config
    assert config.num_hidden_layers == layers - 1
    if name == "lfm2":  # block 1 was attention; block 3 is now block 2 (block 0, a convolution, took the map)
        assert config.layer_types == ["conv", "conv", "full_attention"] and config.full_attn_idxs == [2]


def test_where_the_norms_sit_decides_the_layout(tokenizer, tiny_recipe):
    """OLMo 2 has Llama's linears but normalizes the attention and MLP outputs: it is not taken for a Llama, so depth
    compensation (which folds into an unnormalized MLP output) refuses it before any work."""
    model = _tiny("Olmo2Config")
    step = {"method": "depth", "num_blocks": 1, "compensate": "least_squares"}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    assert pruner.adapter.spec.norms == {
        "attn_out": "post_attention_layernorm",
        "mlp_out": "post_feedforward_layernorm",
    }
    with pytest.raises(RecipeError, match="MLP output is normalized"):
        pruner.prune()
    assert len(model.model.layers) == 3


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
