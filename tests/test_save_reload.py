"""save_pretrained: plain HF reload with identical logits, pruning_config recorded, atomic and careful writes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.errors import OutputExistsError, PruningCheckError

from .conftest import make_tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "phi3"])
def test_reload_gives_identical_logits(family, tmp_path, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:4"}))
    pruner.prune()
    out = pruner.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    cfg = json.loads((out / "config.json").read_text())
    pc = cfg["pruning_config"]
    assert pc["method"] == "wanda" and pc["structure"] == "2:4" and pc["sparsity"] == 0.5
    assert pc["calibration"]["nsamples"] == 4 and pc["hf_prune_version"]
    assert reloaded.config.pruning_config == pc
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["steps"][0]["method"] == "wanda"
    for ref in ModelAdapter(reloaded).all_linears():
        assert int((weight_out_in(ref.module) == 0).sum()) == weight_out_in(ref.module).numel() // 2


def test_refuses_non_empty_folder_unless_overwrite(tmp_path, tokenizer):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    pruner = HFPruner(make_tiny_model("llama"), tokenizer)
    with pytest.raises(OutputExistsError, match="not empty"):
        pruner.save_pretrained(out)
    assert (out / "keep.txt").read_text() == "user data"
    pruner.save_pretrained(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_empty_existing_folder_is_fine(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    HFPruner(make_tiny_model("llama"), tokenizer).save_pretrained(tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").exists()


def test_never_overwrites_the_source_model(tmp_path, tokenizer):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    pruner = HFPruner.from_pretrained(str(src))
    before = (src / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="loaded from"):
        pruner.save_pretrained(src, overwrite=True)
    assert (src / "model.safetensors").read_bytes() == before


def test_crash_while_writing_leaves_no_half_model(tmp_path, tokenizer, monkeypatch):
    pruner = HFPruner(make_tiny_model("llama"), tokenizer)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_crash_during_overwrite_keeps_the_old_folder(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    pruner = HFPruner(make_tiny_model("llama"), tokenizer)
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        pruner.save_pretrained(out, overwrite=True)
    assert (out / "old.txt").read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_never_saves_nan(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(PruningCheckError, match="NaN"):
        HFPruner(model, tokenizer).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_after_pruning_fails_loudly(tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[:, 0] = float("inf")
    recipe = tiny_recipe({"method": "magnitude", "sparsity": 0.3, "targets": ["o"]})
    with pytest.raises(PruningCheckError):
        HFPruner(model, tokenizer, recipe).prune()
