"""The command line is the same API: prune, run a YAML recipe, perplexity; errors are one clear line."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.cli import main
from hf_prune.pruning.masks import nm_violations

from .conftest import make_tiny_model


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    make_tiny_model("qwen3").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path, calib_texts):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in calib_texts) + "\n")
    return path


def test_prune_command(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_folder),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--structure",
            "2:4",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--seed",
            "0",
            "--calib",
            str(calib_file),
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wanda" in printed and "0.5000" in printed and str(out) in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    for ref in ModelAdapter(model).all_linears():
        assert nm_violations(weight_out_in(ref.module), 2, 4) == 0
    assert model.config.pruning_config["calibration"]["seqlen"] == 64


def test_run_command_with_yaml(tiny_folder, calib_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {tiny_folder}
calibration: {{source: {calib_file}, nsamples: 4, seqlen: 64, seed: 0}}
steps:
  - {{method: wanda, sparsity: 0.5}}
eval: {{source: {calib_file}, seqlen: 64, max_windows: 2}}
output: {{dir: {tmp_path / "from_yaml"}}}
""")
    assert main(["run", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity_dense" in printed and "perplexity" in printed
    assert (tmp_path / "from_yaml" / "config.json").exists()
    # Running again refuses to overwrite, with one clear line and exit code 2.
    assert main(["run", str(recipe)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_ppl_command(tiny_folder, calib_file, capsys):
    assert (
        main(
            [
                "ppl",
                "--model",
                str(tiny_folder),
                "--text",
                str(calib_file),
                "--seqlen",
                "64",
                "--max-windows",
                "2",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and "non-overlapping" in result["convention"]


def test_bad_cli_input_is_one_line(tiny_folder, capsys):
    assert main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "1.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sparsity must be in [0, 1)") and "Traceback" not in err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hf_prune.cli", "methods"], capture_output=True, text=True)
    assert result.returncode == 0 and "wanda" in result.stdout and "magnitude" in result.stdout
    assert torch  # the CLI imports torch lazily; the test module needs it for nothing else
