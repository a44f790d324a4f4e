"""Wanda and magnitude on every family: exact sparsity, N:M patterns, and masks equal to the paper's formula."""

import pytest
import torch

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.calibration.data import sample_windows
from hf_prune.pruning.masks import nm_violations
from hf_prune.pruning.scores import wanda_scores

from .conftest import FAMILIES, make_tiny_model


def _dense_weights(adapter):
    return {r.name: weight_out_in(r.module).clone() for r in adapter.all_linears()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "4:8"])
def test_wanda_exact_sparsity_and_pattern(family, structure, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    step = {"method": "wanda", "structure": structure}
    if structure == "unstructured":
        step["sparsity"] = 0.6
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    report = pruner.prune()
    refs = ModelAdapter(model).all_linears()
    assert len(report.steps[0].modules) == len(refs)
    for ref in refs:
        w = weight_out_in(ref.module)
        rows, cols = w.shape
        if structure == "unstructured":
            assert ((w == 0).sum(dim=1) >= int(cols * 0.6)).all()
            assert int((w == 0).sum()) == rows * int(cols * 0.6)  # random weights hold no zeros of their own
        else:
            n, m = map(int, structure.split(":"))
            assert nm_violations(w, n, m) == 0 and int((w == 0).sum()) == rows * cols // 2
    shapes = [tuple(weight_out_in(r.module).shape) for r in refs]
    pruned = sum(rows * (int(cols * 0.6) if structure == "unstructured" else cols // 2) for rows, cols in shapes)
    expected = pruned / sum(rows * cols for rows, cols in shapes)
    assert abs(report.steps[0].sparsity - expected) < 1e-9
    assert model.config.pruning_config["method"] == "wanda"


def _linear_inputs(model, adapter, ids):
    """Inputs of every block linear during a plain forward of the (pruned) model."""
    seen, handles = {}, []
    for ref in adapter.all_linears():
        handles.append(ref.module.register_forward_pre_hook(lambda m, a, name=ref.name: seen.setdefault(name, a[0])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "phi3"])
def test_true_sequential_masks_equal_wanda_formula_on_the_pruned_models_inputs(family, tokenizer, tiny_recipe):
    """One-pass order: each linear is scored on inputs produced by the already pruned part of the model, so
    re-running the pruned model and applying |W| * ||X|| to the DENSE weights must give exactly the zeros applied."""
    model = make_tiny_model(family)
    adapter = ModelAdapter(model)
    dense = _dense_weights(adapter)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5}))
    pruner.prune()
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 0)
    inputs = _linear_inputs(model, adapter, ids)
    for ref in adapter.all_linears():
        x = inputs[ref.name].reshape(-1, inputs[ref.name].shape[-1]).float()
        scores = wanda_scores(dense[ref.name].float(), (x * x).sum(0).sqrt())
        k = int(scores.shape[1] * 0.5)
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(
            1, torch.topk(scores, k, dim=1, largest=False).indices, True
        )
        assert torch.equal(weight_out_in(ref.module) == 0, expected), ref.name


def test_parallel_order_scores_block0_on_dense_inputs(tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    adapter = ModelAdapter(model)
    dense = _dense_weights(adapter)
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 0)
    dense_inputs = _linear_inputs(model, adapter, ids)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5, "true_sequential": False}))
    report = pruner.prune()
    assert report.steps[0].details["order"].startswith("parallel")
    for ref in adapter.linears(0):
        x = dense_inputs[ref.name].reshape(-1, dense_inputs[ref.name].shape[-1])
        scores = wanda_scores(dense[ref.name], (x * x).sum(0).sqrt())
        k = scores.shape[1] // 2
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(
            1, torch.topk(scores, k, dim=1, largest=False).indices, True
        )
        assert torch.equal(weight_out_in(ref.module) == 0, expected), ref.name


def test_chunked_calibration_equals_single_batch_in_parallel_order(tokenizer, tiny_recipe):
    results = []
    for batch_size in (4, 1):
        model = make_tiny_model("qwen2")
        recipe = tiny_recipe({"method": "wanda", "sparsity": 0.5, "true_sequential": False})
        recipe["calibration"]["batch_size"] = batch_size
        HFPruner(model, tokenizer, recipe).prune()
        results.append({r.name: weight_out_in(r.module) == 0 for r in ModelAdapter(model).all_linears()})
    mismatched = [n for n in results[0] if not torch.equal(results[0][n], results[1][n])]
    assert not mismatched


def test_magnitude_needs_no_text_and_prunes_smallest_weights_per_layer():
    model = make_tiny_model("llama")
    dense = _dense_weights(ModelAdapter(model))
    HFPruner(model, None, {"steps": [{"method": "magnitude", "sparsity": 0.5}]}).prune()
    for ref in ModelAdapter(model).all_linears():
        w, d = weight_out_in(ref.module), dense[ref.name]
        assert int((w == 0).sum()) == w.numel() // 2
        assert d[w == 0].abs().max() <= d[w != 0].abs().min()


def test_targets_and_ignore_by_role_and_regex(tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    step = {"method": "wanda", "sparsity": 0.5, "targets": ["down", r"self_attn\.q_proj"], "ignore": [r"layers\.0\."]}
    report = HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    names = {m.name for m in report.steps[0].modules}
    assert names == {f"model.layers.{i}.{p}" for i in (1, 2) for p in ("mlp.down_proj", "self_attn.q_proj")}
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()
    assert (model.model.layers[1].self_attn.k_proj.weight != 0).all()


def test_wanda_beats_magnitude_on_a_tiny_model_output_error(tokenizer, tiny_recipe):
    """Wanda reconstructs the dense outputs better than magnitude at the same sparsity (the paper's claim)."""
    ids = sample_windows(tiny_recipe({})["calibration"]["source"], tokenizer, 4, 64, 1)
    dense = make_tiny_model("llama")
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    errors = {}
    for method in ("magnitude", "wanda"):
        model = make_tiny_model("llama")
        HFPruner(model, tokenizer, tiny_recipe({"method": method, "sparsity": 0.5})).prune()
        with torch.no_grad():
            errors[method] = float((model(input_ids=ids).logits - ref).pow(2).mean())
    assert errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_the_mask_built_a_slab_of_rows_at_a_time_is_the_whole_matrix_mask(structure, monkeypatch):
    """Wanda compares each row on its own, so scoring slabs of rows (bounded memory) changes no mask entry."""
    from hf_prune.calibration.stats import InputNormStats
    from hf_prune.methods.wanda import method as wanda
    from hf_prune.pruning import scores
    from hf_prune.pruning.masks import parse_structure, select_mask

    torch.manual_seed(0)
    weight = torch.randn(37, 24).to(torch.bfloat16)
    stats = InputNormStats(24, torch.device("cpu"))
    stats.update(torch.randn(50, 24))
    shape = parse_structure(structure)
    whole = select_mask(wanda_scores(weight, stats.norms), 0.5, shape, "row")
    monkeypatch.setattr(scores, "SCORE_ELEMENTS", 24 * 5)  # slabs of 5 rows, the last one shorter
    method = wanda.WandaMethod(wanda.WandaConfig(method="wanda", sparsity=0.5))
    _, slabbed = method.prune_weight(weight, stats, 0.5, shape, "w")
    assert torch.equal(slabbed, whole) and int(whole.sum()) == 37 * 12
