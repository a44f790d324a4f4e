"""Block reconstruction: masks fixed exactly, the block's output error goes down, better-or-discarded, deterministic,
and it composes with the orders, OWL, experts, streaming, offload and VLMs."""

import json

import pytest
import torch
from accelerate import cpu_offload

from hf_prune import HFPruner, prune_streaming
from hf_prune.adapters import ModelAdapter
from hf_prune.calibration.data import sample_windows
from hf_prune.calibration.engine import BlockwiseEngine
from hf_prune.cli import main
from hf_prune.errors import PruningCheckError, RecipeError
from hf_prune.pruning.masks import nm_violations
from hf_prune.pruning.reconstruction import MaskedWeights, ReconstructConfig, make_samples, output_error, refit_block

from .conftest import make_tiny_model

FAST = {"epochs": 2, "batch_size": 1}
IDS = torch.randint(0, 3000, (1, 20), generator=torch.Generator().manual_seed(3))


def _weights(model) -> dict[str, torch.Tensor]:
    return {r.name: r.weight().clone() for r in ModelAdapter(model).all_weight_targets()}


def _prune(family, step, tokenizer, tiny_recipe, **kw):
    model = make_tiny_model(family)
    report = HFPruner(model, tokenizer, tiny_recipe(step, **kw)).prune()
    return model, report.steps[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_pattern_exact_and_error_lower_after_reconstruction(family, structure, tokenizer, tiny_recipe):
    step = {"method": "wanda", "structure": structure, "reconstruct": FAST}
    if structure == "unstructured":
        step["sparsity"] = 0.6
    model, report = _prune(family, step, tokenizer, tiny_recipe)
    plain, _ = _prune(family, {**step, "reconstruct": False}, tokenizer, tiny_recipe)
    per_block = report.details["reconstruction"]
    assert sorted(per_block) == list(range(len(ModelAdapter(model).blocks)))
    assert all(e["error_after"] <= e["error_before"] for e in per_block.values())
    assert any(e["kept"] and e["error_after"] < e["error_before"] for e in per_block.values())
    for ref in ModelAdapter(model).all_weight_targets():
        w = ref.weight()
        assert torch.isfinite(w).all()
        if structure == "2:4":
            assert nm_violations(w, 2, 4) == 0 and int((w == 0).sum()) == w.numel() // 2, ref.name
        else:
            assert int((w == 0).sum(dim=1).min()) >= int(w.shape[1] * 0.6), ref.name
    refit = {k: v for k, v in _weights(model).items()}
    untouched = _weights(plain)
    assert any(not torch.equal(refit[k], untouched[k]) for k in refit)  # the refit really changed the survivors
    assert report.modules and all(m.sparsity >= 0.5 for m in report.modules)


def _block0_samples(tokenizer, tiny_recipe, model, structure=(2, 4)):
    """Block 0 of a model: its calibration inputs, the dense targets, and the block pruned 2:4 by magnitude."""
    adapter = ModelAdapter(model)
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 0)
    engine = BlockwiseEngine.from_input_ids(model, adapter, ids, batch_size=4)
    step = next(engine.walk())
    targets = step.forward()
    refs = adapter.weight_targets(0)
    n, m = structure
    for ref in refs:
        w = ref.weight()
        groups = w.abs().reshape(w.shape[0], -1, m)
        drop = groups.argsort(dim=-1)[..., : m - n]
        w.view(w.shape[0], -1, m).scatter_(-1, drop, 0.0)
    return step, refs, targets


@pytest.mark.real_model
def test_refit_respects_the_mask_and_lowers_a_real_model_blocks_error(smollm2_path, tokenizer, tiny_recipe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    model.model.layers = model.model.layers[:1]
    step, refs, targets = _block0_samples(tokenizer, tiny_recipe, model)
    zeros = {r.name: r.weight() == 0 for r in refs}
    weights = MaskedWeights(refs)
    samples = make_samples(step, targets, 1, torch.float32)
    before = output_error(step.forward(), targets)
    with torch.enable_grad():
        refit_block(step.block, weights, samples, ReconstructConfig(epochs=3, batch_size=1))
    after = output_error(step.forward(), targets)
    for p in step.block.parameters():
        p.grad = None
    assert after < 0.9 * before
    for ref in refs:
        assert torch.equal(ref.weight() == 0, zeros[ref.name]), ref.name  # not one pruned weight came back


def test_a_refit_that_leaves_the_mask_is_caught_and_nothing_is_saved(monkeypatch, tokenizer, tiny_recipe, tmp_path):
    monkeypatch.setattr(MaskedWeights, "mask_gradients", lambda self: None)
    monkeypatch.setattr(MaskedWeights, "reapply", lambda self: None)
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:4", "reconstruct": FAST}))
    with pytest.raises(PruningCheckError, match="reconstruction changed the pruned pattern"):
        pruner.prune()
    with pytest.raises(PruningCheckError, match="Nothing saved: the last prune"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_refit_that_does_not_help_is_discarded(tokenizer, tiny_recipe):
    """A destructive learning rate makes every block worse: each is restored, so the model equals no refit."""
    step = {"method": "sparsegpt", "sparsity": 0.5, "reconstruct": {"lr": 0.9, "epochs": 1}}
    model, report = _prune("llama", step, tokenizer, tiny_recipe)
    plain, _ = _prune("llama", {**step, "reconstruct": False}, tokenizer, tiny_recipe)
    per_block = report.details["reconstruction"]
    assert not any(e["kept"] for e in per_block.values())
    assert all(e["error_refit"] > e["error_before"] == e["error_after"] for e in per_block.values())
    a, b = _weights(model), _weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_for_a_seed(tokenizer, tiny_recipe):
    step = {"method": "wanda", "sparsity": 0.5, "reconstruct": {**FAST, "seed": 3}}
    a, _ = _prune("llama", step, tokenizer, tiny_recipe)
    b, _ = _prune("llama", step, tokenizer, tiny_recipe)
    c, _ = _prune("llama", {**step, "reconstruct": {**FAST, "seed": 4}}, tokenizer, tiny_recipe)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize(
    "step",
    [
        {"method": "magnitude", "sparsity": 0.5},  # needs calibration data only for the refit
        {"method": "sparsegpt", "structure": "4:8", "true_sequential": False},
        {"method": "wanda", "sparsity": 0.6, "sparsity_profile": "owl"},
    ],
)
def test_composes_with_every_method_order_and_profile(step, tokenizer, tiny_recipe):
    model, report = _prune("llama", {**step, "reconstruct": FAST}, tokenizer, tiny_recipe)
    assert len(report.details["reconstruction"]) == 3
    assert any(e["kept"] for e in report.details["reconstruction"].values())
    if "sparsity_profile" in step:
        assert len(set(report.details["block_sparsity"].values())) > 1
    for m in report.modules:
        assert abs(m.sparsity - m.target_sparsity) < 0.02


def test_bf16_model_refits_in_float32_and_stays_bf16(tokenizer, tiny_recipe):
    model = make_tiny_model("llama").to(torch.bfloat16)
    report = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:4", "reconstruct": FAST}))
    per_block = report.prune().steps[0].details["reconstruction"]
    assert any(e["kept"] for e in per_block.values())
    assert all(p.dtype == torch.bfloat16 and p.requires_grad and p.grad is None for p in model.parameters())
    for ref in ModelAdapter(model).all_linears():
        assert nm_violations(ref.weight(), 2, 4) == 0


def test_streaming_and_offload_equal_in_memory(tmp_path, tokenizer, tiny_recipe):
    recipe = tiny_recipe({"method": "wanda", "structure": "2:4", "reconstruct": FAST})
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src, max_shard_size="1MB")
    tokenizer.save_pretrained(src)
    memory = HFPruner.from_pretrained(str(src), recipe=recipe)
    memory.prune()
    prune_streaming(src, recipe, tmp_path / "stream")
    from transformers import AutoModelForCausalLM

    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    offloaded = cpu_offload(AutoModelForCausalLM.from_pretrained(src).eval(), execution_device="cpu")
    HFPruner(offloaded, tokenizer, recipe).prune()
    with torch.no_grad():
        expected = memory.model(input_ids=IDS).logits
        assert torch.equal(streamed(input_ids=IDS).logits, expected)
        assert torch.equal(offloaded(input_ids=IDS).logits, expected)


def test_vlm_language_model_with_image_calibration(tokenizer):
    from .test_vlm import _tiny_llava_with_processor

    model, processor = _tiny_llava_with_processor(tokenizer)
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    recipe = {
        "calibration": {"source": "skimage", "nsamples": 3, "seqlen": 24},
        "steps": [{"method": "wanda", "structure": "2:4", "reconstruct": FAST}],
    }
    report = HFPruner(model, recipe=recipe, processor=processor).prune()
    assert any(e["kept"] for e in report.steps[0].details["reconstruction"].values())
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    for ref in ModelAdapter(model).all_linears():
        assert nm_violations(ref.weight(), 2, 4) == 0


@pytest.mark.parametrize(
    "value, message",
    [
        ({"epochs": 0}, "reconstruct.epochs"),
        ({"lr": 2.0}, "reconstruct.lr"),
        ({"solver": "sgd"}, "reconstruct.solver"),
        ({"epoch": 1}, "Did you mean 'epochs'"),
        ("yes", "reconstruct must be true, false or a mapping"),
    ],
)
def test_bad_settings_are_refused_before_any_work(value, message, tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    with pytest.raises(RecipeError, match=message):
        HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5, "reconstruct": value})).prune()


def test_cli_reconstruct_and_saved_config(tmp_path, tokenizer, calib_texts):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(calib_texts[:100]))
    out = tmp_path / "out"
    args = ["prune", "--model", str(src), "--method", "wanda", "--structure", "2:4", "--reconstruct"]
    args += ["--calib", str(text), "--nsamples", "4", "--seqlen", "64", "--output", str(out)]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())["pruning_config"]
    assert config["steps"][0]["reconstruct"] == ReconstructConfig().to_dict()
