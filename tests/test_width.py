"""Structured width pruning: exact shapes, plain reload with identical logits, generate with and without the cache,
the GQA ratio kept, compensation that lowers the consumer's error, and every family working or refused up front."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import WIDTH_FAMILIES, ModelAdapter, weight_out_in
from hf_prune.errors import HFPruneError, RecipeError, UnsupportedModelError
from hf_prune.methods.width import scores as S

from .conftest import FAMILIES, make_tiny_model

IDS = torch.randint(0, 3000, (2, 20), generator=torch.Generator().manual_seed(3))


def _check_reload_and_generate(pruner, tmp_path, trust_remote_code=False):
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)
        cached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    return out, reloaded


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_works_or_refuses_before_any_work(family, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = WIDTH_FAMILIES.get(family)
    step = {"method": "width", "mlp": 0.5, "heads": 0.5}
    if spec is None or not spec.heads:
        with pytest.raises(UnsupportedModelError):
            HFPruner(model, tokenizer, tiny_recipe(step)).prune()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing touched
        if spec is None:
            return
        step.pop("heads")
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune()
    new = pruner.model.config
    assert type(pruner.model) is type(model)  # a plain class: no remote code
    inter = getattr(config, spec.mlp_key) or 4 * config.hidden_size
    assert getattr(new, spec.mlp_key) == inter // 2
    adapter = ModelAdapter(pruner.model)
    for i in range(adapter.num_blocks):
        refs = {r.role: r for r in adapter.linears(i)}
        assert weight_out_in(refs["down"].module).shape[1] == inter // 2
        if "gate_up" in refs:  # Phi-3: both halves of the fused projection narrow alike
            assert weight_out_in(refs["gate_up"].module).shape[0] == inter
        else:
            assert weight_out_in(refs["up"].module).shape[0] == inter // 2
    if "heads" in step:
        new_heads, new_kv = new.num_attention_heads, new.num_key_value_heads
        if kv == 1:
            assert (new_heads, new_kv) == (heads // 2, 1)
        else:
            assert new_kv == kv // 2 and new_heads // new_kv == heads // kv  # whole KV groups: the ratio is kept
        for i in range(adapter.num_blocks):
            refs = {r.role: r for r in adapter.linears(i)}
            if "qkv" in refs:
                assert weight_out_in(refs["qkv"].module).shape[0] == (new_heads + 2 * new_kv) * new.head_dim
            else:
                assert weight_out_in(refs["q"].module).shape[0] == new_heads * new.head_dim
                assert weight_out_in(refs["k"].module).shape[0] == new_kv * new.head_dim
            assert weight_out_in(refs["o"].module).shape[1] == new_heads * new.head_dim
    assert report.steps[0].details["params_removed"] > 0
    out, _ = _check_reload_and_generate(pruner, tmp_path)
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" not in saved and saved["pruning_config"]["method"] == "width"


@pytest.mark.parametrize("criterion", S.CRITERIA)
@pytest.mark.parametrize("compensate", S.COMPENSATIONS)
def test_criteria_and_compensations_on_llama(criterion, compensate, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model("llama")
    step = {"method": "width", "mlp": 0.25, "heads": 0.5, "criterion": criterion, "compensate": compensate}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune().steps[0]
    if compensate == "bias":
        assert pruner.model.config.mlp_bias and pruner.model.config.attention_bias
        assert pruner.model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    errors = report.details["compensation_error"]
    if compensate == "least_squares":
        for block in errors.values():  # the refit lowers the consumer's calibration error in every block
            for part in ("mlp", "heads"):
                assert block[part]["kept"] and block[part]["refit"] < block[part]["plain"]
    else:
        assert not errors
    _check_reload_and_generate(pruner, tmp_path)


def test_least_squares_refit_is_the_optimum_and_bias_keeps_the_mean():
    """The pure math: the refit beats plain slicing (and any perturbation of it) on the data it was fitted on; the
    bias shift makes the narrowed projection's mean output equal the full one's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g) @ torch.randn(32, 32, generator=g) + 0.5
    w = torch.randn(16, 32, generator=g)
    stats = S.ChannelStats(32, torch.device("cpu"), second_moment=True)
    stats.update(x)
    keep = S.keep_top(S.channel_scores("activation", stats, w), 20)
    refit = S.least_squares_refit(w, stats.second_moment, keep, damp=0.0)

    def err(new):
        return float(((x @ w.t() - x[:, keep] @ new.t()) ** 2).mean())

    assert err(refit) < 0.5 * err(w[:, keep])
    assert err(refit) < err(refit + 1e-3 * torch.randn(refit.shape, generator=g))
    removed = torch.tensor(sorted(set(range(32)) - set(keep.tolist())))
    shift = S.bias_shift(w, stats.mean, removed)
    full_mean, cut_mean = (x @ w.t()).mean(0), (x[:, keep] @ w[:, keep].t()).mean(0) + shift
    assert torch.allclose(full_mean, cut_mean, atol=1e-3)


@pytest.mark.real_model
def test_compensation_lowers_the_error_of_a_real_model(smollm2_path, tokenizer, calib_texts):
    """SmolLM2-135M: least squares lowers every consumer's calibration error, and perplexity on held-out text is
    lower with it than with plain slicing."""
    ppl = {}
    for compensate in ("none", "least_squares"):
        model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
        recipe = {
            "calibration": {"source": calib_texts, "nsamples": 16, "seqlen": 128, "seed": 0},
            "steps": [{"method": "width", "mlp": 0.4, "heads": 0.34, "compensate": compensate}],
        }
        pruner = HFPruner(model, tokenizer, recipe)
        report = pruner.prune().steps[0]
        assert pruner.model.config.intermediate_size == 920 and pruner.model.config.num_key_value_heads == 2
        if compensate == "least_squares":
            errors = [block[part] for block in report.details["compensation_error"].values() for part in block]
            assert all(e["kept"] == (e["refit"] < e["plain"]) for e in errors)  # a worse refit is never kept
            assert sum(e["kept"] for e in errors) > 0.8 * len(errors)
        ppl[compensate] = pruner.perplexity("wikipedia", 256, 4)
    assert ppl["least_squares"] < ppl["none"]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "opt"])
def test_per_block_widths_reload_with_the_modeling_file(family, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family, layers=4)
    step = {"method": "width", "mlp": 0.4, "per_block": True, "criterion": "fluctuation", "round_to": 1}
    if family != "opt":
        step["heads"] = 0.5
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune().steps[0]
    widths = report.details["per_block_widths"]
    mlp = [w["mlp"] for w in widths.values()]
    assert len(set(mlp)) > 1  # adaptive: blocks differ
    inter = getattr(model.config, WIDTH_FAMILIES[family].mlp_key)
    assert sum(mlp) == 4 * int(inter * 0.6)  # the uniform plan's total
    assert [report.details["mlp_width"][i] for i in range(4)] == mlp
    out, reloaded = _check_reload_and_generate(pruner, tmp_path, trust_remote_code=True)
    assert "auto_map" in json.loads((out / "config.json").read_text())


def test_bf16_model_stays_bf16(tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model("llama").to(torch.bfloat16)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", "mlp": 0.5, "heads": 0.5}))
    pruner.prune()
    assert {p.dtype for p in pruner.model.parameters()} == {torch.bfloat16}
    out = pruner.save_pretrained(tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("rotation", ["shared", "per_block"])
def test_slicegpt_keeps_the_models_dtype(rotation, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model("llama").to(torch.bfloat16)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "slicegpt", "slicing": 0.25, "rotation": rotation}))
    pruner.prune()
    assert {p.dtype for p in pruner.model.parameters()} == {torch.bfloat16}
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "family, step, error, message",
    [
        ("llama", {"mlp": 0, "heads": 0}, RecipeError, "nothing to remove"),
        ("llama", {"mlp": 1.0}, RecipeError, "fraction in \\[0, 1\\)"),
        ("llama", {"heads": 0.1}, RecipeError, "removes no head"),
        ("llama", {"mlp": 0.2, "criterion": "taylor"}, RecipeError, "criterion must be one of"),
        ("qwen2", {"mlp": 0.2, "compensate": "bias"}, RecipeError, "use compensate: least_squares"),
        ("gpt2", {"heads": 0.5}, UnsupportedModelError, "use mlp only"),
        ("gpt2", {"mlp": 0.2, "per_block": True}, UnsupportedModelError, "per_block"),
    ]
    + [
        ("qwen3_moe", {"mlp": 0.2, "compensate": "bias"}, RecipeError, "not available for expert widths"),
        ("qwen3_moe", {"mlp": 0.2, "per_block": True}, UnsupportedModelError, "per-block widths"),
        ("olmoe", {"heads": 0.5}, UnsupportedModelError, "q_norm.weight normalizes all"),  # over every head
        ("deepseek_v3", {"heads": 0.5}, UnsupportedModelError, "no separate q/k/v"),
    ],
)
def test_bad_requests_are_refused_before_any_work(family, step, error, message, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        HFPruner(model, tokenizer, tiny_recipe({"method": "width", **step})).prune()
    assert issubclass(error, HFPruneError)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


HEAL = {"max_steps": 4, "batch_size": 2, "seqlen": 32, "lr": 1e-3, "lora_r": 4, "warmup_steps": 1}


def test_healing_a_width_pruned_model_distills_by_default(tmp_path, tokenizer, tiny_recipe, calib_texts):
    """After width pruning the student has another shape than its teacher: logits KD (the default here) and the
    hidden-state loss through the kept channels both run, and the healed model saves and reloads."""
    src = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    pruner = HFPruner.from_pretrained(str(src), recipe=tiny_recipe({"method": "width", "mlp": 0.5, "heads": 0.5}))
    pruner.prune()
    first = pruner.heal(**HEAL, source=calib_texts)
    assert first["distill"] and first["mask"] == "none"  # a dense model: plain LoRA
    second = pruner.heal(**HEAL, source=calib_texts, distill_hidden=1.0, distill_alpha=1.0)
    assert second["distill"]
    _check_reload_and_generate(pruner, tmp_path)


def test_hidden_state_distillation_needs_matching_blocks(tmp_path, tokenizer, tiny_recipe, calib_texts):
    src = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    pruner = HFPruner.from_pretrained(str(src), recipe=tiny_recipe({"method": "depth", "num_blocks": 1}))
    pruner.prune()
    assert not pruner.heal(**HEAL, source=calib_texts)["distill"]  # not the default after depth
    with pytest.raises(RecipeError, match="pairs the blocks of student and teacher"):
        pruner.heal(**HEAL, source=calib_texts, distill=True, distill_hidden=1.0)
    with pytest.raises(RecipeError, match="distill_hidden needs distillation"):
        pruner.heal(**HEAL, source=calib_texts, distill=False, distill_hidden=1.0)
