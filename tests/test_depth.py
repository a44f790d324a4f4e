"""Depth pruning: scores pick an identity block first, surgery keeps config and layer_idx consistent, the result
reloads with plain from_pretrained and generates the same with and without the KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, Recipe
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.errors import RecipeError
from hf_prune.methods.depth.method import _identity_block
from hf_prune.methods.depth.scores import angular_distance, best_consecutive_run, lowest_scoring

from .conftest import FAMILIES, MOE_FAMILIES, make_tiny_model


def _make_identity(model, index):
    """Zero the block's output projections: its residual branch adds nothing, so block(x) == x exactly."""
    adapter = ModelAdapter(model)
    for ref in adapter.linears(index):
        if ref.role in ("o", "down"):
            with torch.no_grad():
                ref.module.weight.zero_()
                if getattr(ref.module, "bias", None) is not None:
                    ref.module.bias.zero_()
    return model


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
def test_identity_block_is_chosen_first(criterion, family, tokenizer, tiny_recipe):
    model = _make_identity(make_tiny_model(family, layers=5), 2)
    report = HFPruner(
        model, tokenizer, tiny_recipe({"method": "depth", "criterion": criterion, "num_blocks": 1})
    ).prune()
    details = report.steps[0].details
    assert details["removed_blocks"] == [2]
    scores = (
        details["scores"]["block_influence"]
        if criterion == "block_influence"
        else details["scores"]["angular_distance_n1"]
    )
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores.values()) == scores[2]
    assert ModelAdapter(model).num_blocks == 4


def test_ppl_delta_of_an_identity_block_equals_the_dense_perplexity(tokenizer, tiny_recipe):
    model = _make_identity(make_tiny_model("llama", layers=4), 1)
    recipe = tiny_recipe({"method": "depth", "criterion": "ppl_delta", "num_blocks": 1, "ppl_nsamples": 2})
    pruner = HFPruner(model, tokenizer, recipe)
    from hf_prune.methods.depth.method import DepthConfig, DepthMethod
    from hf_prune.pruning.context import PruneContext

    ctx = PruneContext(model, tokenizer, ModelAdapter(model), pruner.recipe.calibration)
    method = DepthMethod(DepthConfig.from_dict({"method": "depth", "criterion": "ppl_delta", "num_blocks": 1}))
    windows = ctx.calibration_ids()[:2]
    dense = method.calibration_nll(ctx, set(), windows)
    assert method.calibration_nll(ctx, {1}, windows) == pytest.approx(dense, rel=1e-6)
    assert method.calibration_nll(ctx, {2}, windows) != pytest.approx(dense, rel=1e-6)
    report = pruner.prune()
    assert len(report.steps[0].details["scores"]["calibration_ppl_without_block"]) == 4


def test_iterative_ppl_delta_runs_one_round_per_block(tokenizer, tiny_recipe):
    model = make_tiny_model("llama", layers=5)
    step = {"method": "depth", "criterion": "ppl_delta", "num_blocks": 2, "iterative": True, "ppl_nsamples": 1}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    assert len(report.steps[0].details["removed_blocks"]) == 2 and ModelAdapter(model).num_blocks == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_model_equals_the_model_with_those_blocks_bypassed(family):
    ids = torch.randint(0, 3000, (2, 40), generator=torch.Generator().manual_seed(0))
    bypassed = make_tiny_model(family, layers=4)
    adapter = ModelAdapter(bypassed)
    for i in (1, 2):
        adapter.blocks[i].forward = _identity_block
    with torch.no_grad():
        expected = bypassed(input_ids=ids).logits
    model = make_tiny_model(family, layers=4)
    HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [1, 2]}]}).prune()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_config_and_layer_idx_updated(family, tmp_path):
    model = make_tiny_model(family, layers=4)
    types_before = list(getattr(model.config, "layer_types", []) or [])
    pruner = HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [0, 2]}]})
    report = pruner.prune()
    assert model.config.num_hidden_layers == 2
    for new_index, block in enumerate(ModelAdapter(model).blocks):
        assert block.self_attn.layer_idx == new_index
    if family == "gemma3_text":
        assert types_before == ["sliding_attention", "full_attention"] * 2
        assert model.config.layer_types == [types_before[1], types_before[3]]
        assert [b.self_attn.layer_type for b in model.model.layers] == model.config.layer_types
        assert [b.layer_idx for b in model.model.layers] == [0, 1]
    assert report.steps[0].details["removed_blocks"] == [0, 2]
    assert model.config.pruning_config["steps"][0]["removed_blocks"] == [0, 2]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "phi3"])
def test_reload_identical_logits_and_generate_with_cache(family, tmp_path):
    model = make_tiny_model(family, layers=5)
    pruner = HFPruner(model, None, {"steps": [{"method": "depth", "criterion": "random", "num_blocks": 2, "seed": 3}]})
    pruner.prune()
    out = pruner.save_pretrained(tmp_path / "depth")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain class, no remote code
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == 3
    ids = torch.randint(0, 3000, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        with_cache = reloaded.generate(ids, use_cache=True, **kwargs)
        without_cache = reloaded.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache) and with_cache.shape[1] == 42


def test_depth_then_wanda_in_one_recipe(tokenizer, tiny_recipe):
    model = make_tiny_model("llama", layers=5)
    recipe = tiny_recipe({"method": "depth", "criterion": "block_influence", "num_blocks": 2})
    recipe["steps"].append({"method": "wanda", "structure": "2:4"})
    report = HFPruner(model, tokenizer, recipe).prune()
    adapter = ModelAdapter(model)
    assert adapter.num_blocks == 3 and len(report.steps) == 2
    assert {int(m.name.split(".")[2]) for m in report.steps[1].modules} == {0, 1, 2}
    for ref in adapter.all_linears():
        assert int((weight_out_in(ref.module) == 0).sum()) == weight_out_in(ref.module).numel() // 2
    assert model.config.pruning_config["method"] == "depth+wanda"


def test_keep_first_and_last(tokenizer, tiny_recipe):
    model = _make_identity(make_tiny_model("llama", layers=6), 0)
    step = {"method": "depth", "criterion": "block_influence", "num_blocks": 2, "keep_first": 1, "keep_last": 2}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    assert all(1 <= b <= 3 for b in report.steps[0].details["removed_blocks"])


def test_bad_depth_requests(tokenizer, tiny_recipe):
    model = make_tiny_model("llama", layers=4)
    with pytest.raises(RecipeError, match="leave none"):
        HFPruner(model, None, {"steps": [{"method": "depth", "num_blocks": 4}]}).prune()
    with pytest.raises(RecipeError, match="out of range"):
        HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [1, 7]}]}).prune()
    with pytest.raises(RecipeError, match="ratio must be in"):
        Recipe.from_dict({"steps": [{"method": "depth", "ratio": 1.0}]})
    with pytest.raises(RecipeError, match="exactly one of"):
        Recipe.from_dict({"steps": [{"method": "depth", "ratio": 0.2, "num_blocks": 2}]})
    with pytest.raises(RecipeError, match="criterion"):
        Recipe.from_dict({"steps": [{"method": "depth", "criterion": "cosine", "num_blocks": 1}]})
    with pytest.raises(RecipeError, match="removable"):
        HFPruner(
            model, tokenizer, tiny_recipe({"method": "depth", "num_blocks": 2, "keep_first": 2, "keep_last": 1})
        ).prune()
    assert ModelAdapter(model).num_blocks == 4  # nothing was removed by the refused requests


def test_score_helpers():
    assert angular_distance(1.0) == 0.0 and angular_distance(-1.0) == 1.0
    assert lowest_scoring({0: 0.5, 1: 0.1, 2: 0.3, 3: 0.0}, 2, [0, 1, 2]) == [1, 2]
    assert best_consecutive_run({0: 0.4, 1: 0.2, 2: 0.1}, 2, [0, 1, 2, 3]) == [2, 3]
    assert best_consecutive_run({0: 0.4, 1: 0.2, 2: 0.1}, 2, [0, 1, 2]) == [1, 2]


def _reload_checked(pruner, tmp_path):
    out = pruner.save_pretrained(tmp_path / "depth")
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return reloaded.eval()


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_every_family_reloads_without_missing_or_unexpected_keys(family, tmp_path):
    model = make_tiny_model(family, layers=5)
    pruner = HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [0, 3]}]})
    pruner.prune()
    reloaded = _reload_checked(pruner, tmp_path)
    ids = torch.randint(0, 3000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        # Llama 4: MoE every 2nd block (1, 3, 5); removing 0 and 3 leaves MoE blocks 1, 5 -> new indices 0, 3
        ("llama4_text", {}, {"moe_layers": [0, 3]}),
        # Qwen-MoE: MoE where (i + 1) % 2 == 0 and i not in mlp_only_layers -> made explicit
        ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [5]}, {"decoder_sparse_step": 1}),
        # DeepSeek: the first k blocks are dense; removing block 0 leaves one leading dense block
        ("deepseek_v3", {"first_k_dense_replace": 2}, {"first_k_dense_replace": 1}),
    ],
)
def test_interleaved_moe_layouts_are_renumbered(family, overrides, expected, tmp_path):
    from transformers import AutoModelForCausalLM as Auto

    from .conftest import tiny_config

    config = tiny_config(family, layers=6)
    for key, value in overrides.items():
        setattr(config, key, value)
    if family == "llama4_text":
        config.moe_layers = [1, 3, 5]
    torch.manual_seed(0)
    model = Auto.from_config(config).eval()
    kinds = [ModelAdapter(model).moe_spec(i) is not None for i in range(6)]
    pruner = HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [0, 3]}]})
    pruner.prune()
    for key, value in expected.items():
        assert getattr(model.config, key) == value
    reloaded = _reload_checked(pruner, tmp_path)
    after = [ModelAdapter(reloaded).moe_spec(i) is not None for i in range(4)]
    assert after == [k for i, k in enumerate(kinds) if i not in (0, 3)]


def test_a_per_layer_structure_it_cannot_renumber_is_refused_before_any_work(monkeypatch):
    from hf_prune.surgery import blocks as surgery

    monkeypatch.setattr(surgery, "_LAYER_INDEX_LISTS", ())  # as if hf_prune did not know Llama 4's moe_layers
    model = make_tiny_model("llama4_text", layers=4)
    with pytest.raises(RecipeError, match="per-layer structure hf_prune cannot renumber"):
        HFPruner(model, None, {"steps": [{"method": "depth", "blocks": [0]}]}).prune()
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
