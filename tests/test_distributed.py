"""Data-parallel calibration under torchrun (2 CPU processes, gloo): the same pruned model as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter

from .conftest import make_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
IDS = torch.randint(0, 3000, (1, 24), generator=torch.Generator().manual_seed(7))


def torchrun(model_dir, recipe, out, env=None, nproc=2):
    recipe_file = out.parent / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_PRUNE_DIST_TIMEOUT": "120", **(env or {})}
    return subprocess.run([*cmd, str(model_dir), str(recipe_file), str(out)], capture_output=True, text=True, env=env)


@pytest.fixture
def calib_file(tmp_path, calib_texts):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in calib_texts) + "\n")
    return str(path)


@pytest.fixture
def saved(tmp_path, tokenizer):
    def build(family):
        path = tmp_path / f"src-{family}"
        make_tiny_model(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return build


def _weights(model):
    return {r.name: r.weight().detach().clone() for r in ModelAdapter(model).all_weight_targets()}


@pytest.mark.parametrize(
    "family, steps",
    [
        ("llama", [{"method": "wanda", "sparsity": 0.5}]),
        ("llama", [{"method": "sparsegpt", "structure": "2:4"}]),
        # parallel order: the block's solves are spread over the ranks and broadcast (gpt-oss: strided expert views)
        ("llama", [{"method": "sparsegpt", "sparsity": 0.5, "true_sequential": False}]),
        ("gpt_oss", [{"method": "sparsegpt", "structure": "2:4", "true_sequential": False}]),
        ("qwen3_moe", [{"method": "sparsegpt", "sparsity": 0.5}]),
        (
            "qwen3_moe",
            [{"method": "experts", "criterion": "reap", "num_experts": 2}, {"method": "wanda", "sparsity": 0.5}],
        ),
        (
            "llama",
            [
                {"method": "depth", "criterion": "angular", "num_blocks": 1},
                {"method": "wanda", "sparsity": 0.5, "sparsity_profile": "owl"},
            ],
        ),
    ],
)
def test_two_processes_prune_like_one(family, steps, saved, tmp_path, calib_file):
    src = saved(family)
    recipe = {"calibration": {"source": calib_file, "nsamples": 8, "seqlen": 64, "seed": 0}, "steps": steps}
    single = HFPruner.from_pretrained(str(src), recipe=recipe)
    single.prune()
    result = torchrun(src, recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.pruning_config["world_size"] == 2
    details = json.loads((tmp_path / "out" / "pruning_report.json").read_text())["steps"][-1]["details"]
    if steps[-1].get("true_sequential") is False:  # weight-parallel solving: both ranks solved part of every block
        assert len(details["solves_per_rank"]) == 2 and min(details["solves_per_rank"]) > 0
    assert model.config.num_hidden_layers == single.model.config.num_hidden_layers
    ours, theirs = _weights(model), _weights(single.model)
    assert set(ours) == set(theirs)
    for name in ours:
        agree = float(((ours[name] == 0) == (theirs[name] == 0)).float().mean())
        assert agree >= 0.999, (name, agree)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits, single.model(input_ids=IDS).logits, rtol=1e-3, atol=1e-3
        )


@pytest.mark.parametrize("order", [{"true_sequential": False}, {"true_sequential": True, "batch_size": 1}])
def test_experts_calibrated_in_groups_under_torchrun_give_the_same_weights(order, saved, tmp_path, calib_file):
    """Routed experts calibrated and solved one group per pass (one expert per group here), every group's
    statistics reduced over the ranks and, in parallel order, its solves spread over them: the same saved weights as
    all experts at once, so the ranks' collectives pair up group by group."""
    src = saved("qwen3_moe")
    step = {"method": "sparsegpt", "sparsity": 0.5, "true_sequential": order["true_sequential"]}
    calibration = {"source": calib_file, "nsamples": 8, "seqlen": 64, "seed": 0}
    if "batch_size" in order:
        calibration["batch_size"] = order["batch_size"]
    weights = []
    for memory in (None, 1e-9):
        steps = [{**step, **({"moe_stats_memory": memory} if memory else {})}]
        out = tmp_path / f"out-{memory}"
        result = torchrun(src, {"calibration": calibration, "steps": steps}, out)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((out / "pruning_report.json").read_text())["steps"][-1]["details"]
        assert ("moe_stats_passes" in report) == (memory is not None)
        weights.append(_weights(AutoModelForCausalLM.from_pretrained(out)))
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


def test_ranks_with_uneven_shares_of_the_windows_walk_alike(saved, tmp_path, calib_file):
    """9 windows over 2 ranks at 4 per chunk: one rank has two chunks, the other one. Both take the staged order (a
    one-pass rank would call other collectives than a staged one: routed experts pair up per call, not per stage)."""
    src = saved("qwen3_moe")
    calibration = {"source": calib_file, "nsamples": 9, "seqlen": 64, "seed": 0, "batch_size": 4}
    recipe = {"calibration": calibration, "steps": [{"method": "sparsegpt", "sparsity": 0.5}]}
    result = torchrun(src, recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    details = json.loads((tmp_path / "out" / "pruning_report.json").read_text())["steps"][-1]["details"]
    assert details["order"].startswith("true-sequential (one pass per input group")


def test_ranks_agree_on_the_automatic_chunk_size(saved, tmp_path, calib_file):
    """No batch_size: each rank sizes its chunks from its own free memory, and every rank takes the smallest size
    (rank 1 sees room for 2 of its 4 windows, rank 0 for all of them): both walk 2 chunks, as one process would."""
    from hf_prune.calibration.engine import estimate_block_bytes_per_sample

    src = saved("llama")
    per_sample = estimate_block_bytes_per_sample(AutoModelForCausalLM.from_pretrained(src), 64)
    calibration = {"source": calib_file, "nsamples": 8, "seqlen": 64, "seed": 0}
    recipe = {"calibration": calibration, "steps": [{"method": "sparsegpt", "sparsity": 0.5}]}
    room_for_two = str(int(2.5 * per_sample / 0.35))
    result = torchrun(src, recipe, tmp_path / "out", env={"HF_PRUNE_TEST_RANK1_FREE_BYTES": room_for_two})
    assert result.returncode == 0, result.stderr[-3000:]
    details = json.loads((tmp_path / "out" / "pruning_report.json").read_text())["steps"][-1]["details"]
    assert details["order"] == "true-sequential (one pass per input group, 2 chunks)"  # rank 0 writes the report


def test_a_failing_rank_stops_every_rank_and_nothing_is_written(saved, tmp_path, calib_file):
    src = saved("llama")
    recipe = {
        "calibration": {"source": calib_file, "nsamples": 8, "seqlen": 64},
        "steps": [{"method": "wanda", "sparsity": 0.5}],
    }
    result = torchrun(src, recipe, tmp_path / "out", env={"HF_PRUNE_TEST_FAIL_RANK": "1"})
    assert result.returncode != 0 and "this rank fails on purpose" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_a_killed_torchrun_prune_resumes_to_the_identical_result(saved, tmp_path, calib_file):
    """Rank 0 dies right after its first block commit (inside the second step, after a structural first step);
    the relaunched ranks continue from the work folder: every tensor equals an uninterrupted resumable run's."""
    from safetensors.torch import load_file

    from hf_prune.resume import work_folder_for

    src = saved("llama")
    steps = [{"method": "depth", "criterion": "angular", "num_blocks": 1}, {"method": "sparsegpt", "sparsity": 0.5}]

    def recipe(out):
        calibration = {"source": calib_file, "nsamples": 8, "seqlen": 64, "seed": 0}
        return {"calibration": calibration, "steps": steps, "output": {"dir": str(out)}}

    resumable = {"HF_PRUNE_TEST_RESUME": "1"}
    ref = tmp_path / "ref"
    assert torchrun(src, recipe(ref), ref, env=resumable).returncode == 0

    out = tmp_path / "out"
    killed = torchrun(src, recipe(out), out, env={**resumable, "HF_PRUNE_TEST_KILL_AFTER": "1"})
    work = work_folder_for(out)
    assert killed.returncode != 0 and not out.exists()
    state = json.loads((work / "state.json").read_text())
    assert (state["step"], state["next_block"]) == (1, 1) and (work / "model-s0").is_dir()
    assert sorted(p.name for p in (work / "inputs-b1").iterdir()) == ["rank0", "rank1"]

    resumed = torchrun(src, recipe(out), out, env=resumable)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and not work.exists()
    ours, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_balanced_assignment():
    from hf_prune.distributed import balanced_assignment

    owners = balanced_assignment([8.0, 1.0, 1.0, 4.0, 4.0, 1.0, 1.0], 2)
    loads = [sum(c for c, o in zip([8.0, 1.0, 1.0, 4.0, 4.0, 1.0, 1.0], owners) if o == r) for r in range(2)]
    assert loads == [10.0, 10.0]
    assert balanced_assignment([1.0] * 5, 3) == balanced_assignment([1.0] * 5, 3)  # deterministic
