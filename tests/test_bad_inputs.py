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


# ------------------------------------------------------------------ refused before anything is loaded
def _no_load(monkeypatch):
    """Fail the test if a model load starts: the checks must come first."""
    import hf_prune.pruner as pruner_module

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pruner_module, "load_pretrained", boom)
    monkeypatch.setattr(pruner_module, "resolve_packaged_model", boom)


@pytest.mark.parametrize("kind", ["not_empty", "source_folder"])
def test_cli_refuses_the_output_folder_before_loading(kind, tmp_path, monkeypatch, capsys):
    from hf_prune.cli import main

    src = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(src)
    out = src if kind == "source_folder" else tmp_path / "out"
    if kind == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    capsys.readouterr()  # the progress bar of the save above
    _no_load(monkeypatch)
    code = main(["prune", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert ("not empty" in err) if kind == "not_empty" else ("loaded from" in err)
    if kind == "not_empty":
        assert (out / "keep.txt").read_text() == "user data"


def test_api_refuses_the_output_folder_before_loading(tmp_path, monkeypatch):
    from hf_prune.errors import OutputExistsError

    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    src = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(src)
    _no_load(monkeypatch)
    recipe = {"steps": [{"method": "magnitude", "sparsity": 0.5}], "output": {"dir": str(out)}}
    with pytest.raises(OutputExistsError, match="not empty"):
        HFPruner.from_pretrained(str(src), recipe=recipe)


@pytest.mark.parametrize(
    "model, message",
    [
        ("{missing}", "does not exist here and is not a Hub id"),
        ("{empty}", "folder without config.json"),
        ("{file}", "is a file"),
        ("./relative/path/to/model", "does not exist here"),
        ("org/name/extra", "not a Hub id"),
    ],
)
def test_bad_model_sources_are_one_error_line(model, message, tmp_path, monkeypatch, capsys):
    from hf_prune.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    model = model.format(missing=tmp_path / "nothing", empty=tmp_path / "empty", file=tmp_path / "weights.safetensors")
    _no_load(monkeypatch)
    for argv in (
        ["prune", "--model", model, "--method", "wanda", "--sparsity", "0.5"],
        ["ppl", "--model", model],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_hub_ids_pass_the_source_check():
    from hf_prune.checkpoint import check_model_source

    for ok in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "packaged:smollm2-135m", "Qwen/Qwen3-30B-A3B"):
        check_model_source(ok)


def test_a_killed_save_leaves_nothing_behind_on_the_next_save(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    stale = [tmp_path / ".out.tmp-abc123", tmp_path / ".out.old-def456"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    HFPruner(model, tokenizer, {"steps": [{"method": "magnitude", "sparsity": 0.5}]}).save_pretrained(tmp_path / "out")
    assert not any(folder.exists() for folder in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
