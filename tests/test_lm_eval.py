"""lm-evaluation-harness on pruned models: in memory, through hf-prune eval, and through lm-eval's own CLI."""

import json
import subprocess
import sys

import pytest

from hf_prune import HFPruner
from hf_prune.cli import main
from hf_prune.errors import HFPruneError
from hf_prune.eval.harness import SHIPPED_TASKS, build_mc_items, task_dir
from hf_prune.hub import build_model_card

from .conftest import make_tiny_model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("lm") / "wanda"
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    pruner.prune()
    pruner.save_pretrained(folder)
    return folder


def test_mc_items_are_real_text_with_one_true_continuation():
    docs = [
        f"Article {i} is about topic {i} and it goes on for {i} more words than the article {i + 1}."
        for i in range(40)
    ]
    items = build_mc_items(docs, n_items=10)
    assert len(items) == 10
    for i, item in enumerate(items):
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["context"] + item["choices"][item["label"]] == docs[i]
    same_ending = [f"Article {i} is about topic {i} and it ends the same way as all the others do." for i in range(9)]
    assert build_mc_items(same_ending, n_items=5) == []  # no distinct distractors: no items rather than bad ones


def test_evaluate_in_memory_and_into_the_card(tmp_path, tokenizer, tiny_recipe):
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5}))
    pruner.prune()
    results = pruner.evaluate(limit=4)
    assert set(results) == set(SHIPPED_TASKS)
    assert 0.0 <= results["wikipedia_lead_mc"]["acc"] <= 1.0
    assert results["wikipedia_lead_ppl"]["word_perplexity"] > 1.0
    assert pruner.report.evaluation["lm_eval"]["wikipedia_lead_mc"]["acc"] == results["wikipedia_lead_mc"]["acc"]
    folder = pruner.save_pretrained(tmp_path / "m")
    card = build_model_card(folder)
    assert "lm_eval / wikipedia_lead_mc" in card and f"{results['wikipedia_lead_ppl']['word_perplexity']:.4f}" in card


def test_unknown_task_is_named(tokenizer):
    with pytest.raises(HFPruneError, match="no_such_task"):
        HFPruner(make_tiny_model("llama"), tokenizer).evaluate(tasks=["no_such_task"], limit=1)


def test_hf_prune_eval_cli(saved_tiny, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(saved_tiny),
                "--tasks",
                "wikipedia_lead_mc",
                "--limit",
                "4",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["results"]["wikipedia_lead_mc"]["acc"] <= 1.0


def test_lm_eval_own_cli_runs_on_a_saved_pruned_model(saved_tiny, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={saved_tiny}",
        "--tasks",
        "wikipedia_lead_mc",
        "--include_path",
        str(task_dir()),
        "--limit",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "res"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wikipedia_lead_mc" in result.stdout and "acc" in result.stdout
