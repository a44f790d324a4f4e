"""SparseGPT and OWL through the engine: exact sparsity, N:M, the solver fed with the right Hessians,
dampening fallback reported, OWL block sparsities averaging to the target."""

import pytest
import torch

from hf_prune import HFPruner, Recipe
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.calibration.data import sample_windows
from hf_prune.errors import RecipeError
from hf_prune.methods.sparsegpt.solver import sparsegpt_prune
from hf_prune.pruning.masks import Structure, nm_violations
from hf_prune.pruning.owl import outlier_ratio, owl_sparsities

from .conftest import FAMILIES, make_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_exact_sparsity_and_pattern(family, structure, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    step = {"method": "sparsegpt", "structure": structure, "blocksize": 32}
    if structure == "unstructured":
        step["sparsity"] = 0.6
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    for ref in ModelAdapter(model).all_linears():
        w = weight_out_in(ref.module)
        assert torch.isfinite(w).all()
        if structure == "unstructured":
            assert int((w == 0).sum()) == int(w.numel() * 0.6)
        else:
            assert nm_violations(w, 2, 4) == 0 and int((w == 0).sum()) == w.numel() // 2
    assert len(report.steps[0].modules) == len(ModelAdapter(model).all_linears())


def test_block0_weights_equal_the_solver_on_dense_hessians(tokenizer, tiny_recipe):
    """Parallel order: block 0's linears see the dense model's inputs, so the method must produce exactly what the
    pure solver produces from H = 2/n X^T X of those inputs."""
    model = make_tiny_model("llama")
    adapter = ModelAdapter(model)
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 0)
    inputs, handles = {}, []
    for ref in adapter.linears(0):
        handles.append(ref.module.register_forward_pre_hook(lambda m, a, n=ref.name: inputs.setdefault(n, a[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    expected = {}
    for ref in adapter.linears(0):
        x = inputs[ref.name].reshape(-1, inputs[ref.name].shape[-1]).float()
        H = 2.0 / x.shape[0] * x.t() @ x
        expected[ref.name], _, _ = sparsegpt_prune(weight_out_in(ref.module), H, 0.5, Structure(), blocksize=32)
    step = {"method": "sparsegpt", "sparsity": 0.5, "blocksize": 32, "true_sequential": False}
    HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    for ref in adapter.linears(0):
        torch.testing.assert_close(weight_out_in(ref.module), expected[ref.name], rtol=1e-4, atol=1e-5)


def _output_error(step, tokenizer, tiny_recipe, ids):
    dense = make_tiny_model("llama")
    model = make_tiny_model("llama")
    HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    with torch.no_grad():
        return float((model(input_ids=ids).logits - dense(input_ids=ids).logits).pow(2).mean())


def test_sparsegpt_reconstructs_better_than_wanda_at_high_sparsity(tokenizer, tiny_recipe):
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 7)
    wanda = _output_error({"method": "wanda", "sparsity": 0.7}, tokenizer, tiny_recipe, ids)
    sparsegpt = _output_error({"method": "sparsegpt", "sparsity": 0.7}, tokenizer, tiny_recipe, ids)
    assert sparsegpt < wanda


def test_rank_deficient_calibration_raises_dampening_and_reports_it(tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    step = {"method": "sparsegpt", "sparsity": 0.5, "percdamp": 1e-9}
    report = HFPruner(model, tokenizer, tiny_recipe(step, nsamples=1, seqlen=8)).prune()  # 8 tokens, 64 inputs
    raised = report.steps[0].details["dampening_raised"]
    assert raised and all(v > 1e-9 for v in raised.values())
    for ref in ModelAdapter(model).all_linears():
        assert torch.isfinite(weight_out_in(ref.module)).all()


def test_owl_sparsities_formula():
    s = owl_sparsities([0.01, 0.05, 0.03, 0.02], target=0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[1] == min(s) and s[0] == max(s)  # most outliers -> least pruned
    assert owl_sparsities([0.02, 0.02], 0.5, 0.1) == [0.5, 0.5]


def test_outlier_ratio():
    scores = [torch.ones(10), torch.tensor([1.0] * 8 + [100.0, 100.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(2 / 20)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_profile_through_the_pruner(method, tokenizer, tiny_recipe):
    model = make_tiny_model("llama", layers=4)
    step = {"method": method, "sparsity": 0.6, "sparsity_profile": "owl", "owl_lambda": 0.1, "owl_m": 2.0}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    per_block = report.steps[0].details["block_sparsity"]
    assert sorted(per_block) == [0, 1, 2, 3]
    assert sum(per_block.values()) / 4 == pytest.approx(0.6, abs=1e-6)
    assert max(per_block.values()) - min(per_block.values()) <= 0.2 + 1e-9
    assert len(set(per_block.values())) > 1
    adapter = ModelAdapter(model)
    for i, s in per_block.items():
        for ref in adapter.linears(i):
            w = weight_out_in(ref.module)
            expected = w.shape[0] * int(w.shape[1] * s + 1e-9) if method == "wanda" else int(w.numel() * s + 1e-9)
            assert int((w == 0).sum()) == expected
    assert set(report.steps[0].details["owl_outlier_ratio"]) == {0, 1, 2, 3}


def test_owl_with_nm_is_refused_with_a_reason():
    with pytest.raises(RecipeError, match="owl gives each block its own sparsity"):
        Recipe.from_dict({"steps": [{"method": "wanda", "structure": "2:4", "sparsity_profile": "owl"}]})
    with pytest.raises(RecipeError, match="owl_lambda"):
        Recipe.from_dict({"steps": [{"method": "wanda", "sparsity": 0.95, "sparsity_profile": "owl"}]})
