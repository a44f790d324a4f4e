"""Damaged checkpoints and outputs that cannot be created: one `error:` line, exit 2, before anything is loaded or
calibrated, on every subcommand (streaming included)."""

from __future__ import annotations

import json
import os

import pytest

from hf_prune.cli import main

from .conftest import make_tiny_model
from .test_bad_inputs import _no_load


def _sharded(tmp_path, tokenizer):
    src = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(src, max_shard_size="2MB")
    tokenizer.save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    return src


def _damage(src, kind):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / sorted(set(index["weight_map"].values()))[-1]
    if kind == "config_not_json":
        (src / "config.json").write_text('{"model_type": "llama", ')
        return "not valid JSON"
    if kind == "truncated_shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
        return "truncated or damaged"
    if kind == "corrupt_header":
        data = bytearray(shard.read_bytes())
        data[8:40] = b"\x00" * 32
        shard.write_bytes(bytes(data))
        return "not a valid safetensors file"
    if kind == "missing_shard":
        shard.unlink()
        return "missing"
    raise ValueError(kind)


COMMANDS = {
    "prune": lambda m, out: ["prune", "--model", m, "--method", "wanda", "--sparsity", "0.5", "--output", out],
    "streaming": lambda m, out: ["prune", "--model", m, "--method", "wanda", "--sparsity", "0.5", "--streaming",
                                 "--output", out],
    "ppl": lambda m, out: ["ppl", "--model", m],
    "eval": lambda m, out: ["eval", "--model", m, "--limit", "1"],
    "push": lambda m, out: ["push", "--model", m, "--repo-id", "me/x"],
}  # fmt: skip


@pytest.mark.parametrize("kind", ["config_not_json", "truncated_shard", "corrupt_header", "missing_shard"])
def test_a_damaged_checkpoint_is_one_error_line_on_every_subcommand(kind, tmp_path, tokenizer, monkeypatch, capsys):
    src = _sharded(tmp_path, tokenizer)
    message = _damage(src, kind)
    capsys.readouterr()
    _no_load(monkeypatch)
    for name, argv in COMMANDS.items():
        out = tmp_path / f"out-{name}"
        assert main(argv(str(src), str(out))) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert not out.exists()


def test_a_recipe_run_refuses_a_damaged_checkpoint(tmp_path, tokenizer, monkeypatch, capsys):
    src = _sharded(tmp_path, tokenizer)
    _damage(src, "truncated_shard")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\nsteps: [{{method: wanda, sparsity: 0.5}}]\noutput: {{dir: {tmp_path / 'o'}}}\n")
    _no_load(monkeypatch)
    assert main(["run", str(recipe)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_an_output_under_a_file_is_refused_before_loading(tmp_path, tokenizer, monkeypatch, capsys):
    src = _sharded(tmp_path, tokenizer)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out"
    capsys.readouterr()
    _no_load(monkeypatch)
    for argv in (COMMANDS["prune"](str(src), str(out)), COMMANDS["streaming"](str(src), str(out)),
                 ["vlm-harness", "--output", str(out)]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_in_a_read_only_folder_is_refused(tmp_path, tokenizer, monkeypatch, capsys):
    src = _sharded(tmp_path, tokenizer)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    _no_load(monkeypatch)
    try:
        assert main(COMMANDS["prune"](str(src), str(locked / "out"))) == 2
        assert "does not accept new folders" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_a_healthy_sharded_checkpoint_passes_the_checks(tmp_path, tokenizer):
    from hf_prune.checkpoint import check_model_source

    check_model_source(str(_sharded(tmp_path, tokenizer)))


def test_a_folder_that_refuses_new_entries_is_named(tmp_path, monkeypatch):
    """What a non-root user gets for a read-only parent (root bypasses permissions, so the refusal is simulated)."""
    import tempfile

    from hf_prune.checkpoint import check_output_dir
    from hf_prune.errors import OutputExistsError

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputExistsError, match="does not accept new folders"):
        check_output_dir(tmp_path / "new" / "out", False, [])
