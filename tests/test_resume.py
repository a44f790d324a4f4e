"""Resumable prunes: a prune killed after any block continues from its work folder to the bit-identical result; a
resume with other settings is refused; the folder goes once the model is saved."""

from __future__ import annotations

import json

import pytest
import torch

from hf_prune import HFPruner
from hf_prune.errors import RecipeError
from hf_prune.pruning.weight_pruning import WeightPruningMethod
from hf_prune.resume import work_folder_for

from .conftest import make_tiny_model


class Killed(Exception):
    pass


def _kill_after(monkeypatch, n: int, owner=WeightPruningMethod, name: str = "_prune_ref") -> None:
    """Make the call after the n-th of ``owner.name`` (default: each pruned target) raise, as a kill would stop
    the process there."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def killing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, killing)


RECIPES = {
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5}],
    "owl+wanda-2of4": [
        {"method": "wanda", "sparsity": 0.5, "sparsity_profile": "owl", "owl_lambda": 0.05},
        {"method": "wanda", "structure": "2:4", "reconstruct": {"batch_size": 2}},
    ],
    "magnitude": [{"method": "magnitude", "sparsity": 0.5}],
}


def _recipe(tiny_recipe, steps, out, batch_size=0):
    recipe = tiny_recipe(steps[0], output={"dir": str(out)})
    recipe["steps"] = steps
    recipe["calibration"]["batch_size"] = batch_size
    return recipe


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("kill_at", [1, 8, 15, 30])  # 7 linears per block, 3 blocks: in block 0, 1, 2; step 2
def test_a_killed_prune_resumes_to_the_identical_result(name, kill_at, tmp_path, tokenizer, tiny_recipe, monkeypatch):
    if kill_at >= 21 * len(RECIPES[name]):
        pytest.skip("a one-step recipe has no second step to kill")
    out = tmp_path / "out"
    reference = make_tiny_model("llama")
    HFPruner(reference, tokenizer, _recipe(tiny_recipe, RECIPES[name], tmp_path / "ref")).prune()

    with monkeypatch.context() as m:
        _kill_after(m, kill_at)
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, RECIPES[name], out)).prune(resume=True)
    work = work_folder_for(out)
    assert (work / "state.json").exists() and not out.exists()

    pruner = HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, RECIPES[name], out))
    with monkeypatch.context() as m:
        _kill_after(m, 10**9)  # counts only
        solved = []
        original = WeightPruningMethod._prune_ref
        m.setattr(WeightPruningMethod, "_prune_ref", lambda self, *a, **k: solved.append(1) or original(self, *a, **k))
        report = pruner.prune(resume=True)
    total = 21 * len(RECIPES[name])
    done_before = min(kill_at, total) // 7 * 7  # whole blocks committed before the kill
    assert len(solved) == total - done_before
    for (n, a), b in zip(reference.state_dict().items(), pruner.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert sum(len(s.modules) for s in report.steps) == 21 * len(RECIPES[name])
    pruner.save_pretrained(out)
    assert not work.exists()


def test_resume_with_chunked_calibration(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    steps = RECIPES["sparsegpt"]
    reference = make_tiny_model("llama")
    HFPruner(reference, tokenizer, _recipe(tiny_recipe, steps, tmp_path / "ref", batch_size=1)).prune()
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 10)
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, steps, out, 1)).prune(resume=True)
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, steps, out, 1))
    pruner.prune(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), pruner.model.state_dict().values()))


def test_a_resume_with_other_settings_is_refused(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 5)
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, RECIPES["sparsegpt"], out)).prune(
                resume=True
            )
    other = [{"method": "sparsegpt", "sparsity": 0.6}]
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="other settings"):
        HFPruner(model, tokenizer, _recipe(tiny_recipe, other, out)).prune(resume=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


STRUCTURAL = [
    {"method": "depth", "num_blocks": 1},
    {"method": "width", "mlp": 0.5},
    {"method": "sparsegpt", "sparsity": 0.5},
]


@pytest.mark.parametrize("where", ["width block 2", "sparsegpt block 1", "sparsegpt block 1, onloaded"])
def test_a_killed_prune_with_structural_steps_resumes_to_the_identical_result(
    where, tmp_path, tokenizer, tiny_recipe, monkeypatch
):
    """Depth and width resume from their last finished step (the model as it left them, saved in the work folder);
    the weight step after them from its last finished block."""
    onload = {"onload": True, "device": "cpu"} if "onloaded" in where else {}

    def recipe(out):
        return {**_recipe(tiny_recipe, STRUCTURAL, out), **onload}

    reference = HFPruner(make_tiny_model("llama", layers=4), tokenizer, recipe(tmp_path / "ref"))
    reference.prune()
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        if where.startswith("width"):
            from hf_prune.methods.width.method import WidthMethod

            _kill_after(m, 1, WidthMethod, "_prune_block")
        else:
            _kill_after(m, 10)
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama", layers=4), tokenizer, recipe(out)).prune(resume=True)
    work = work_folder_for(out)
    last = "model-s0" if where.startswith("width") else "model-s1"  # the latest snapshot replaces older ones
    assert [p.name for p in work.glob("model-s*")] == [last]
    pruner = HFPruner(make_tiny_model("llama", layers=4), tokenizer, recipe(out))
    report = pruner.prune(resume=True)
    assert [s.method for s in report.steps] == ["depth", "width", "sparsegpt"]
    saved = pruner.save_pretrained(out)
    assert not work.exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    expected = AutoModelForCausalLM.from_pretrained(reference.save_pretrained(tmp_path / "ref"))
    assert reloaded.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert reloaded.config.pruning_config["steps"] == expected.config.pruning_config["steps"]


def test_per_block_widths_are_not_resumable_yet(tmp_path, tokenizer, tiny_recipe):
    recipe = _recipe(tiny_recipe, [{"method": "width", "mlp": 0.5, "per_block": True}], tmp_path / "out")
    with pytest.raises(RecipeError, match="cannot be resumed yet"):
        HFPruner(make_tiny_model("llama"), tokenizer, recipe).prune(resume=True)


def test_cli_resume(tmp_path, tokenizer, monkeypatch, capsys):
    from hf_prune.cli import main

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    argv = ["prune", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--calib", "wikipedia-tail",
            "--nsamples", "4", "--seqlen", "64", "--output", str(tmp_path / "out"), "--resume"]  # fmt: skip
    with monkeypatch.context() as m:
        _kill_after(m, 9)
        with pytest.raises(Killed):
            main(argv)
    assert work_folder_for(tmp_path / "out").exists()
    assert main(argv) == 0
    assert (tmp_path / "out" / "config.json").exists() and not work_folder_for(tmp_path / "out").exists()
    assert main(argv[:-1] + ["--streaming", "--resume", "--overwrite"]) == 0  # streaming resumes too
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_resume_onloaded(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    """Weights in host memory behind accelerate hooks (onload: true): blocks restored and committed through them."""
    steps = RECIPES["sparsegpt"]
    reference = make_tiny_model("llama")
    HFPruner(reference, tokenizer, _recipe(tiny_recipe, steps, tmp_path / "ref")).prune()
    out = tmp_path / "out"

    def recipe():
        return {**_recipe(tiny_recipe, steps, out), "onload": True, "device": "cpu"}

    with monkeypatch.context() as m:
        _kill_after(m, 10)
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama"), tokenizer, recipe()).prune(resume=True)
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, recipe())
    pruner.prune(resume=True)
    saved = pruner.save_pretrained(out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), reloaded.state_dict().values()))


def test_killed_after_the_last_blocks_commit(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    """A kill between the last block's commit and the step's: the resume has no block left to walk."""
    from hf_prune.resume import WorkFolder

    steps = RECIPES["sparsegpt"]
    reference = make_tiny_model("llama")
    HFPruner(reference, tokenizer, _recipe(tiny_recipe, steps, tmp_path / "ref")).prune()
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(WorkFolder, "commit_step", lambda self, *a: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, steps, out)).prune(resume=True)
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, _recipe(tiny_recipe, steps, out))
    report = pruner.prune(resume=True)
    assert len(report.steps[0].modules) == 21
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), pruner.model.state_dict().values()))


def test_a_folder_that_is_not_a_work_folder_is_never_adopted(tmp_path, tokenizer, tiny_recipe):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    recipe = _recipe(tiny_recipe, RECIPES["sparsegpt"], tmp_path / "out")
    with pytest.raises(RecipeError, match="holds no hf_prune work state"):
        HFPruner(make_tiny_model("llama"), tokenizer, recipe).prune(resume=True, work_dir=mine)
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("kill_at", [3, 10, 22])  # in block 0 and 1 of step 1; in step 2 (magnitude: block 1)
def test_a_killed_streaming_prune_resumes_to_the_identical_checkpoint(kill_at, tmp_path, tokenizer, tiny_recipe):
    """Streaming reads blocks a killed run committed from the work folder, the rest from the source checkpoint, and
    writes the checkpoint an uninterrupted streaming run writes, byte for byte in every tensor."""
    import glob

    from safetensors.torch import load_file

    from hf_prune import prune_streaming

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src, max_shard_size="1MB")
    tokenizer.save_pretrained(src)
    steps = [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.6, "targets": ["k"]}]
    prune_streaming(src, _recipe(tiny_recipe, steps, tmp_path / "ref"), tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as m:
        _kill_after(m, kill_at)
        with pytest.raises(Killed):
            prune_streaming(src, _recipe(tiny_recipe, steps, out), out, resume=True)
    assert (work_folder_for(out) / "state.json").exists() and not out.exists()
    with pytest.MonkeyPatch.context() as m:
        solved, original = [], WeightPruningMethod._prune_ref
        m.setattr(WeightPruningMethod, "_prune_ref", lambda self, *a, **k: solved.append(1) or original(self, *a, **k))
        report = prune_streaming(src, _recipe(tiny_recipe, steps, out), out, resume=True)
    done = min(kill_at, 21) // 7 * 7 + max(0, kill_at - 21)  # committed blocks' targets (7, then 1 per block)
    assert len(solved) == 21 + 3 - done
    assert [s.method for s in report.steps] == ["sparsegpt", "magnitude"]
    assert not work_folder_for(out).exists()

    def tensors(folder):
        return {k: v for f in glob.glob(str(folder / "*.safetensors")) for k, v in load_file(f).items()}

    ref, got = tensors(tmp_path / "ref"), tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_config = json.loads((tmp_path / "ref" / "config.json").read_text())["pruning_config"]
    assert json.loads((out / "config.json").read_text())["pruning_config"]["steps"] == ref_config["steps"]


def test_structural_resume_refuses_a_dispatched_model_and_a_full_disk(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    """A snapshot is loaded back on one device (or onloaded): an accelerate dispatch is refused before any work; so
    is a work folder without room for the snapshot."""
    import shutil
    from collections import namedtuple

    from accelerate import cpu_offload

    steps = [{"method": "depth", "num_blocks": 1}, {"method": "wanda", "sparsity": 0.5}]
    model = cpu_offload(make_tiny_model("llama", layers=4), execution_device="cpu")
    with pytest.raises(RecipeError, match="dispatched by accelerate"):
        HFPruner(model, tokenizer, _recipe(tiny_recipe, steps, tmp_path / "a")).prune(resume=True)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    model = make_tiny_model("llama", layers=4)
    with pytest.raises(RecipeError, match="GiB are free there"):
        HFPruner(model, tokenizer, _recipe(tiny_recipe, steps, tmp_path / "b")).prune(resume=True)
    assert len(model.model.layers) == 4 and not work_folder_for(tmp_path / "b").exists()


def test_a_last_structural_step_is_not_snapshotted(tmp_path, tokenizer, tiny_recipe, monkeypatch):
    """Its result is the output itself: a kill before the save redoes it from the previous commit."""
    from hf_prune.resume import WorkFolder

    commits = []
    original = WorkFolder.commit_step
    monkeypatch.setattr(
        WorkFolder,
        "commit_step",
        lambda self, step, report, config, save=None: (
            commits.append((step, save)) or original(self, step, report, config, save)
        ),
    )
    steps = [{"method": "wanda", "sparsity": 0.5}, {"method": "depth", "num_blocks": 1}]
    HFPruner(make_tiny_model("llama", layers=4), tokenizer, _recipe(tiny_recipe, steps, tmp_path / "o")).prune(
        resume=True
    )
    assert commits == [(0, None)]
