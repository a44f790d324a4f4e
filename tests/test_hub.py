"""Push to and pull from a Hub on loopback through the real huggingface_hub / transformers code paths."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard

from hf_prune import HFPruner
from hf_prune.hub import HubError, build_model_card, push_folder

from .conftest import make_tiny_model
from .hub_server import BAD_TOKEN, LoopbackHub

TOKEN = "hf_test_token_write"
IDS = torch.randint(0, 3000, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


def pull_logits(hub, tmp_path, repo_id, revision=None):
    """from_pretrained(repo_id) in a fresh process with an empty cache, pointed at the loopback Hub."""
    script = tmp_path / "pull.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({repo_id!r}, revision={revision!r}).eval()
        tok = AutoTokenizer.from_pretrained({repo_id!r}, revision={revision!r})
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({IDS.tolist()})).logits
        torch.save({{"logits": logits, "pc": model.config.pruning_config, "vocab": len(tok)}}, sys.argv[1])
    """)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp_path / f"hf_home_{revision}"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    out = tmp_path / f"pulled_{revision}.pt"
    result = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture
def pruned(tokenizer, tiny_recipe):
    pruner = HFPruner(
        make_tiny_model("llama"),
        tokenizer,
        tiny_recipe(
            {"method": "wanda", "structure": "2:4"},
            eval={"source": tiny_recipe({})["calibration"]["source"], "seqlen": 32, "max_windows": 2},
        ),
    )
    pruner.prune()
    return pruner


def test_push_then_pull_into_empty_cache_gives_identical_logits(hub, tmp_path, pruned, tokenizer):
    url = pruned.push_to_hub("tester/tiny-wanda-2of4", token=TOKEN, endpoint=hub.endpoint)
    assert "tester/tiny-wanda-2of4" in url
    pulled = pull_logits(hub, tmp_path, "tester/tiny-wanda-2of4")
    with torch.no_grad():
        assert torch.equal(pulled["logits"], pruned.model(input_ids=IDS).logits)
    assert pulled["pc"]["method"] == "wanda" and pulled["vocab"] == len(tokenizer)


def test_model_card_metadata_and_numbers(hub, tmp_path, pruned):
    pruned.push_to_hub("tester/card", token=TOKEN, endpoint=hub.endpoint)
    files = hub.state.repos["tester/card"]["main"][-1][1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning_report.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert {"pruned", "hf_prune", "wanda", "sparsity-2of4"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    report = pruned.report
    assert f"{report.params_after:,}" in card.text and f"{report.nonzero_after:,}" in card.text
    assert f"{report.evaluation['perplexity']:.4f}" in card.text
    assert f"{report.evaluation['perplexity_dense']:.4f}" in card.text
    assert 'from_pretrained("tester/card")' in card.text and "structure: '2:4'" in card.text


def test_card_names_hub_base_model_only(tmp_path, tokenizer):
    folder = tmp_path / "m"
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, {"steps": [{"method": "magnitude", "sparsity": 0.5}]})
    pruner._base_model = "HuggingFaceTB/SmolLM2-135M"
    pruner.prune()
    pruner.save_pretrained(folder)
    assert ModelCard(build_model_card(folder)).data.base_model == "HuggingFaceTB/SmolLM2-135M"
    pruner._base_model = str(tmp_path)  # a local path is not a Hub id
    pruner._record_pruning_config()
    pruner.save_pretrained(folder, overwrite=True)
    assert ModelCard(build_model_card(folder)).data.base_model is None


def test_second_push_and_revision_returns_the_first(hub, tmp_path, pruned, tokenizer, tiny_recipe):
    first = pruned.push_to_hub("tester/versions", token=TOKEN, endpoint=hub.endpoint)
    with torch.no_grad():
        v1 = pruned.model(input_ids=IDS).logits
        pruned.model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        v2 = pruned.model(input_ids=IDS).logits
    second = pruned.push_to_hub("tester/versions", token=TOKEN, endpoint=hub.endpoint)
    sha1 = first.rstrip("/").split("/")[-1]
    assert sha1 != second.rstrip("/").split("/")[-1]
    assert torch.equal(pull_logits(hub, tmp_path, "tester/versions", revision=sha1)["logits"], v1)
    assert torch.equal(pull_logits(hub, tmp_path, "tester/versions")["logits"], v2)


def test_push_to_a_branch(hub, pruned):
    pruned.push_to_hub("tester/branchy", token=TOKEN, endpoint=hub.endpoint, revision="pruned-v1")
    assert "pruned-v1" in hub.state.repos["tester/branchy"]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", ["401", "404", "refused"])
def test_hub_errors_are_clear_and_leave_the_local_model_alone(case, hub, tmp_path, pruned):
    folder = pruned.save_pretrained(tmp_path / "saved")
    before = _snapshot(folder)
    if case == "401":
        endpoint, token, match = hub.endpoint, BAD_TOKEN, "rejected the token"
    elif case == "404":
        endpoint, token, match = hub.endpoint + "/no-such-prefix", TOKEN, "404"
    else:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        endpoint, token, match = f"http://127.0.0.1:{port}", TOKEN, "Could not reach"
    with pytest.raises(HubError, match=match):
        push_folder(folder, "tester/fails", token=token, endpoint=endpoint)
    assert _snapshot(folder) == before and "README.md" not in before


def test_cli_push(hub, tmp_path, pruned):
    folder = pruned.save_pretrained(tmp_path / "saved")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-m", "hf_prune.cli", "push", "--model", str(folder), "--repo-id", "tester/from-cli"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "README.md" in hub.state.repos["tester/from-cli"]["main"][-1][1]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_prune.cli",
            "push",
            "--model",
            str(folder),
            "--repo-id",
            "tester/x",
            "--token",
            BAD_TOKEN,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "rejected the token" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads((folder / "config.json").read_text())["pruning_config"]["method"] == "wanda"
