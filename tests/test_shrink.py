"""shrink: a parameter or speed target reached by the best mix of depth and width, as a plain checkpoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.errors import RecipeError

from .conftest import make_tiny_model

IDS = torch.randint(0, 3000, (1, 20), generator=torch.Generator().manual_seed(3))


def _shrink(step, tokenizer, tiny_recipe, layers=4):
    model = make_tiny_model("llama", layers=layers)
    total = sum(p.numel() for p in model.parameters())
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "shrink", "eval_nsamples": 2, **step}))
    return pruner, pruner.prune().steps[0].details, total


def test_parameter_target_tries_every_mix_and_keeps_the_best(tokenizer, tiny_recipe, tmp_path):
    pruner, details, total = _shrink({"params": 0.99}, tokenizer, tiny_recipe)
    tried = [c for c in details["candidates"] if "calibration_ppl" in c]
    assert len(tried) >= 2 and len({(c["blocks_removed"], c["mlp_removed"]) for c in tried}) == len(tried)
    chosen = details["chosen"]
    assert chosen["calibration_ppl"] == min(c["calibration_ppl"] for c in tried)
    params = sum(p.numel() for p in pruner.model.parameters())
    assert params == chosen["params"] and abs(params / total - 0.99) < 0.003
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain class: depth and uniform width only
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


@pytest.mark.parametrize(
    "step, feasible",
    [
        # blocks are 2% of this tiny model (its embeddings dominate): heads fit a 1% cut, hidden channels do not
        ({"params": 0.99, "heads": [0.0, 0.5], "hidden": [0.0, 0.125]}, {(0.0, 0.0), (0.5, 0.0)}),
        ({"params": 0.87, "depth_shares": [0.0], "hidden": [0.125]}, {(0.0, 0.125)}),
    ],
)
def test_candidates_mix_heads_and_hidden_channels_too(step, feasible, tokenizer, tiny_recipe, tmp_path):
    """heads / hidden lists: every combination with every depth share is a candidate (MLP neurons take the rest of
    the budget); each is reported, infeasible ones as such, the best is kept and reloads as a plain checkpoint."""
    pruner, details, total = _shrink({"depth_shares": [0.0, 0.5], **step}, tokenizer, tiny_recipe)
    tried = [c for c in details["candidates"] if "calibration_ppl" in c]
    assert {(c["heads_removed"], c["hidden_removed"]) for c in tried} == feasible
    assert all(
        not c["feasible"] for c in details["candidates"] if "calibration_ppl" not in c and not c["same_as_earlier"]
    )
    for c in tried:  # every candidate near the target, whichever axes it used
        assert abs(c["params_kept"] - step["params"]) < 0.005, c
    assert details["chosen"]["calibration_ppl"] == min(c["calibration_ppl"] for c in tried)
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


def test_speed_target_picks_among_candidates_that_reach_it(monkeypatch, tokenizer, tiny_recipe):
    """Latency replaced by a deterministic cost (the block parameters a forward touches), so the choice among
    candidates is tested without depending on this machine's load; the real clock runs in the benchmarks."""
    from hf_prune.adapters import ModelAdapter
    from hf_prune.methods.shrink import method as shrink

    def block_cost(model, tokens, runs):
        return float(sum(p.numel() for b in ModelAdapter(model).blocks for p in b.parameters()))

    monkeypatch.setattr(shrink, "prefill_latency", block_cost)
    step = {"speedup": 1.25, "depth_shares": [0.0, 0.5, 1.0]}
    pruner, details, total = _shrink(step, tokenizer, tiny_recipe, layers=6)
    tried = [c for c in details["candidates"] if "speedup" in c]
    assert len(tried) >= 2 and all(c["speedup"] >= 1.25 for c in tried)
    assert details["chosen"]["calibration_ppl"] == min(c["calibration_ppl"] for c in tried)
    assert details["chosen"]["params"] == sum(p.numel() for p in pruner.model.parameters()) < total


@pytest.mark.parametrize(
    "step, message",
    [
        ({}, "exactly one of params"),
        ({"params": 0.9, "speedup": 2.0}, "exactly one of params"),
        ({"params": 1.5}, "fraction of parameters to keep"),
        ({"speedup": 0.5}, "> 1"),
        ({"params": 0.5}, "no mix of depth and width reaches it"),
        ({"speedup": 1.5, "heads": [0.0, 0.5]}, "speed targets mix depth and MLP neurons only"),
        ({"params": 0.9, "hidden": [1.0]}, "fractions in \\[0, 1\\)"),
    ],
)
def test_bad_targets_are_refused_before_any_work(step, message, tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    with pytest.raises(RecipeError, match=message):
        HFPruner(model, tokenizer, tiny_recipe({"method": "shrink", **step})).prune()


def test_shrink_candidates_can_compensate_depth(tokenizer, tiny_recipe):
    """depth_compensate reaches the depth step of every candidate: the same blocks go, the model differs."""
    ids = torch.randint(0, 3000, (1, 16), generator=torch.Generator().manual_seed(0))
    logits, removed = {}, {}
    for compensate in ("none", "least_squares"):
        step = {"params": 0.99, "depth_shares": [1.0], "depth_compensate": compensate}
        pruner, details, total = _shrink(step, tokenizer, tiny_recipe)
        removed[compensate] = details["chosen"]["blocks_removed"]
        with torch.no_grad():
            logits[compensate] = pruner.model(input_ids=ids).logits
    assert removed["none"] == removed["least_squares"] >= 1
    assert not torch.allclose(logits["none"], logits["least_squares"])
