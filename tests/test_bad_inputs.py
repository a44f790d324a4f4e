"""Bad requests get a clear, actionable error before any work starts, and lose nothing."""

import pytest
import torch

from hf_prune import HFPruner, Recipe
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.calibration.data import sample_windows
from hf_prune.errors import CalibrationDataError, RecipeError

from .conftest import make_tiny_model


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, "half", True])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(RecipeError, match="sparsity"):
        Recipe.from_dict({"steps": [{"method": "wanda", "sparsity": sparsity}]})


def test_sparsity_required_for_unstructured():
    with pytest.raises(RecipeError, match="'sparsity' is required"):
        Recipe.from_dict({"steps": [{"method": "wanda"}]})


@pytest.mark.parametrize("structure", ["4:4", "3:2", "2-4", "0:4"])
def test_malformed_nm(structure):
    with pytest.raises(RecipeError, match="N:M|structure"):
        Recipe.from_dict({"steps": [{"method": "wanda", "structure": structure}]})


def test_nm_sparsity_contradiction():
    with pytest.raises(RecipeError, match="contradicts"):
        Recipe.from_dict({"steps": [{"method": "wanda", "sparsity": 0.7, "structure": "2:4"}]})


def test_nm_width_not_divisible_fails_before_any_weight_changes(tokenizer, tiny_recipe):
    model = make_tiny_model("llama")  # in_features 64 and 128: 5 does not divide them
    before = {r.name: weight_out_in(r.module).clone() for r in ModelAdapter(model).all_linears()}
    with pytest.raises(RecipeError, match="divisible by 5"):
        HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:5"})).prune()
    for r in ModelAdapter(model).all_linears():
        assert torch.equal(weight_out_in(r.module), before[r.name])


def test_unknown_keys_are_named():
    with pytest.raises(RecipeError, match="Unknown key 'sparsty'.*Did you mean 'sparsity'"):
        Recipe.from_dict({"steps": [{"method": "wanda", "sparsty": 0.5}]})
    with pytest.raises(RecipeError, match="Unknown key 'calibraton'"):
        Recipe.from_dict({"calibraton": {}, "steps": []})
    with pytest.raises(RecipeError, match="Unknown key 'nsample'"):
        Recipe.from_dict({"calibration": {"nsample": 3}})


def test_unknown_method_lists_available():
    with pytest.raises(RecipeError, match="Unknown pruning method 'wando'.*wanda"):
        Recipe.from_dict({"steps": [{"method": "wando", "sparsity": 0.5}]})


def test_empty_recipe_refuses_to_prune(tokenizer):
    with pytest.raises(RecipeError, match="no steps"):
        HFPruner(make_tiny_model("llama"), tokenizer, {}).prune()


def test_too_little_text_says_found_and_needed(tokenizer):
    with pytest.raises(CalibrationDataError) as err:
        sample_windows(["A short text.", "Another one."], tokenizer, nsamples=4, seqlen=128, seed=0)
    msg = str(err.value)
    assert "tokens" in msg and "4 x seqlen=128 = 512" in msg.replace("nsamples=", "")


def test_too_little_text_through_the_pruner_changes_nothing(tokenizer):
    model = make_tiny_model("llama")
    before = weight_out_in(model.model.layers[0].mlp.up_proj).clone()
    recipe = {
        "calibration": {"source": ["tiny text"], "nsamples": 2, "seqlen": 64},
        "steps": [{"method": "wanda", "sparsity": 0.5}],
    }
    with pytest.raises(CalibrationDataError, match="Too little calibration text"):
        HFPruner(model, tokenizer, recipe).prune()
    assert torch.equal(weight_out_in(model.model.layers[0].mlp.up_proj), before)


def test_seqlen_beyond_model_positions(tokenizer, tiny_recipe):
    model = make_tiny_model("gpt2")
    with pytest.raises(RecipeError, match="max_position_embeddings"):
        HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5}, seqlen=4096)).prune()


def test_no_targets_match(tokenizer, tiny_recipe):
    with pytest.raises(RecipeError, match="No linear matches"):
        HFPruner(
            make_tiny_model("llama"),
            tokenizer,
            tiny_recipe({"method": "wanda", "sparsity": 0.5, "targets": ["nothing_like_this"]}),
        ).prune()


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_yaml("configs/does_not_exist.yaml")


def test_missing_local_calibration_file_is_treated_as_dataset_and_explained(tokenizer):
    with pytest.raises(CalibrationDataError, match="Could not load the dataset"):
        from hf_prune.calibration.data import load_documents

        load_documents("no/such-dataset-here", split="train")
