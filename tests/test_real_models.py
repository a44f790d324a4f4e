"""The packaged pretrained models (SmolLM2-135M: llama; Gemma-3-270m: gemma3_text) prune as the papers say."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.assets import resolve_packaged_model
from hf_prune.pruning.masks import nm_violations

pytestmark = pytest.mark.real_model

CALIB = {"source": "fortunes", "nsamples": 8, "seqlen": 128, "seed": 0}
EVAL = {"source": "wikipedia", "seqlen": 256, "max_windows": 4}


def _prune(model_id, step, with_dense=False):
    recipe = {"calibration": CALIB, "steps": [step], "eval": {**EVAL, "dense": with_dense}}
    pruner = HFPruner.from_pretrained(model_id, recipe=recipe)
    pruner.embeddings_before = pruner.model.get_input_embeddings().weight.detach().clone()
    return pruner, pruner.prune()


def test_smollm2_wanda_beats_magnitude_and_keeps_exact_sparsity(tmp_path):
    wanda, wanda_report = _prune("packaged:smollm2-135m", {"method": "wanda", "sparsity": 0.5}, with_dense=True)
    _, magnitude_report = _prune("packaged:smollm2-135m", {"method": "magnitude", "sparsity": 0.5})
    dense_ppl = wanda_report.evaluation["perplexity_dense"]
    assert 5 < dense_ppl < 40
    assert dense_ppl < wanda_report.evaluation["perplexity"] < magnitude_report.evaluation["perplexity"]
    assert wanda_report.family == "llama" and wanda_report.num_blocks == 30
    for module in wanda_report.steps[0].modules:
        assert module.pruned == module.shape[0] * (module.shape[1] // 2)
        assert module.sparsity >= 0.5


def test_smollm2_wanda_2of4_reloads_with_identical_logits(tmp_path):
    pruner, report = _prune("packaged:smollm2-135m", {"method": "wanda", "structure": "2:4"})
    out = pruner.save_pretrained(tmp_path / "smollm2-2of4")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = pruner.tokenizer("Pruning keeps the model useful.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(pruner.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    for ref in ModelAdapter(reloaded).all_linears():
        assert nm_violations(weight_out_in(ref.module), 2, 4) == 0


def test_gemma3_wanda_2of4():
    path = resolve_packaged_model("packaged:gemma3-270m")
    pruner, report = _prune(path, {"method": "wanda", "structure": "2:4"}, with_dense=True)
    assert report.family == "gemma3_text" and report.num_blocks == 18
    assert report.evaluation["perplexity_dense"] < report.evaluation["perplexity"] < 1e4
    for ref in ModelAdapter(pruner.model).all_linears():
        assert nm_violations(weight_out_in(ref.module), 2, 4) == 0
    # Embeddings (tied with the head) are untouched.
    assert torch.equal(pruner.model.get_input_embeddings().weight, pruner.embeddings_before)
