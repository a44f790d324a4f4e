"""Where a prune runs: device selection, sequential onloading (weights in host memory, one block at a time on the
execution device), accelerate offload for every step, compute dtype on CPUs without bf16, and masks that do not
depend on the calibration batch size."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, placement
from hf_prune.errors import RecipeError
from hf_prune.recipe import Recipe

from .conftest import DISK_OFFLOAD_MAP, make_tiny_model
from .method_matrix import DENSE, MOE, zeros_of

IDS = torch.randint(0, 3000, (1, 20), generator=torch.Generator().manual_seed(3))

NOT_OFFLOADABLE = ("slicegpt", "shrink")  # refused on offloaded weights (tested below)
STEPS = {name: step for name, step in DENSE.items() if name not in NOT_OFFLOADABLE}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _in_memory(tokenizer, recipe):
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, recipe)
    pruner.prune()
    return pruner


@pytest.mark.parametrize("name", list(STEPS))
def test_onloaded_prune_equals_in_memory(name, tokenizer, tiny_recipe, tmp_path):
    """onload: true keeps the weights in host memory (accelerate hooks, meta tensors between forwards) and brings
    each block onto the execution device while it is worked on: the same weights as the in-memory prune, structural
    steps included, and a checkpoint that reloads to the same logits."""
    reference = _in_memory(tokenizer, tiny_recipe(STEPS[name]))
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, tiny_recipe(STEPS[name], onload=True, device="cpu"))
    report = pruner.prune()
    assert report.placement["mode"] == "onloaded"
    assert "onloaded" in report.steps[0].details["ran_on"]
    if not name.startswith("width"):  # width rebuilds the model and dispatches it again the same way
        assert pruner.model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert getattr(pruner.model, "hf_prune_onloaded", None) == "cpu"
    assert torch.allclose(_logits(pruner.model), _logits(reference.model), atol=1e-5, rtol=1e-4)
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=name == "width-per-block")
    assert torch.allclose(_logits(reloaded), _logits(reference.model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MOE))
def test_onloaded_moe_prune_equals_in_memory(name, tokenizer, tiny_recipe, tmp_path):
    """Mixture of experts onloaded: expert weights, expert removal and expert widths as in memory, and a reload."""
    reference = HFPruner(make_tiny_model("qwen3_moe"), tokenizer, tiny_recipe(MOE[name]))
    reference.prune()
    recipe = tiny_recipe(MOE[name], onload=True, device="cpu")
    pruner = HFPruner(make_tiny_model("qwen3_moe"), tokenizer, recipe)
    assert pruner.prune().placement["mode"] == "onloaded"
    assert torch.allclose(_logits(pruner.model), _logits(reference.model), atol=1e-5, rtol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    assert torch.allclose(_logits(reloaded), _logits(reference.model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["width-ls", "width-heads", "width-per-block", "width-hidden"])
def test_cpu_offloaded_structural_steps_keep_the_offload(name, tokenizer, tiny_recipe):
    """A model the user wrapped with accelerate.cpu_offload: width rebuilds it and offloads the result again."""
    reference = _in_memory(tokenizer, tiny_recipe(STEPS[name]))
    model = cpu_offload(make_tiny_model("llama"), execution_device="cpu")
    pruner = HFPruner(model, tokenizer, tiny_recipe(STEPS[name]))
    pruner.prune()
    assert pruner.model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # offloaded again
    assert torch.allclose(_logits(pruner.model), _logits(reference.model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["width-ls", "width-hidden"])
def test_disk_offloaded_width_prunes_and_reloads(name, tmp_path, tokenizer, tiny_recipe):
    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, device_map=DISK_OFFLOAD_MAP, offload_folder=str(tmp_path / "off")
    )
    reference = _in_memory(tokenizer, tiny_recipe(STEPS[name]))
    pruner = HFPruner(model, tokenizer, tiny_recipe(STEPS[name]))
    pruner.prune()
    for key in ("hidden_size", "intermediate_size"):
        assert getattr(pruner.model.config, key) == getattr(reference.model.config, key)
    got = _logits(pruner.model)
    assert torch.allclose(got, _logits(reference.model), atol=1e-5, rtol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    assert torch.allclose(_logits(reloaded), got, atol=1e-6)


@pytest.mark.parametrize("step", [{"method": "slicegpt", "slicing": 0.25}, {"method": "shrink", "params": 0.8}])
def test_steps_that_cannot_follow_offloaded_weights_are_refused_before_any_work(step, tokenizer, tiny_recipe):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="offloaded"):
        HFPruner(model, tokenizer, tiny_recipe(step, onload=True, device="cpu")).prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not placement.is_dispatched(model)  # refused before anything moved


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_do_not_depend_on_the_calibration_batch_size(family, method, tokenizer, tiny_recipe):
    """True-sequential with chunked calibration (one pass per group of linears sharing an input): the same masks
    as one forward per block, whatever batch size memory allows (>= 99.9% of entries; the rest summation order)."""
    masks = {}
    for batch_size in (0, 1, 3):
        model = make_tiny_model(family)
        recipe = tiny_recipe({"method": method, "sparsity": 0.5}, nsamples=6)
        recipe["calibration"]["batch_size"] = batch_size
        report = HFPruner(model, tokenizer, recipe).prune()
        assert report.steps[0].details["order"].startswith("true-sequential")
        masks[batch_size] = {n: p == 0 for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n}
    total = sum(m.numel() for m in masks[0].values())
    for batch_size in (1, 3):
        equal = sum(int((masks[0][k] == masks[batch_size][k]).sum()) for k in masks[0])
        assert equal / total >= 0.999, (batch_size, equal / total)
    if family != "qwen3_moe":  # dense linears: exactly equal
        assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_device_choice_without_an_accelerator(tokenizer):
    model = make_tiny_model("llama")
    adapter = HFPruner(model, tokenizer, {"steps": []}).adapter
    if placement.accelerator() is None:
        assert placement.resolve_device("auto") == torch.device("cpu")
        p = placement.plan(model, adapter, "auto")
        assert (p.device, p.mode) == (torch.device("cpu"), "in_place")
        with pytest.raises(RecipeError, match="no CUDA"):
            placement.resolve_device("cuda")
    with pytest.raises(RecipeError, match="device must be"):
        placement.resolve_device("tpu:0")
    with pytest.raises(RecipeError, match="onload must be"):
        Recipe.from_dict({"onload": "sometimes"})
    assert Recipe.from_dict({"device": "cpu", "onload": True}).to_dict()["onload"] is True


def test_bf16_on_a_cpu_without_bf16_units_computes_blocks_in_float32(tokenizer, tiny_recipe, monkeypatch):
    """Detected from the CPU's flags: bf16 weights are stored bf16, each block computed in float32 while pruned."""
    monkeypatch.setattr(placement, "_cpu_flags", lambda: frozenset({"avx2"}))
    model = make_tiny_model("llama").to(torch.bfloat16)
    report = HFPruner(model, tokenizer, tiny_recipe(STEPS["sparsegpt-2of4"])).prune()
    assert report.placement["storage_dtype"] == "bfloat16" and report.placement["compute_dtype"] == "float32"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    monkeypatch.setattr(placement, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert placement.compute_dtype_for(torch.device("cpu"), torch.bfloat16) == torch.bfloat16
    assert placement.compute_dtype_for(torch.device("cuda"), torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("name", list(DENSE) + list(MOE))
def test_bf16_matches_float32_for_every_method(name, tokenizer, tiny_recipe):
    """bf16 weights (computed in float32 per block on this CPU without bf16 units): the masks agree with the
    float32 prune, the logits stay close, and the dtype is kept."""
    family, step = ("qwen3_moe", MOE[name]) if name in MOE else ("llama", DENSE[name])
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_model(family).to(dtype)
        pruner = HFPruner(model, tokenizer, tiny_recipe(step))
        pruner.prune()
        assert all(p.dtype == dtype for p in pruner.model.parameters() if p.is_floating_point())
        results[dtype] = pruner.model
    a, b = zeros_of(results[torch.float32]), zeros_of(results[torch.bfloat16])
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())
    assert agree > 0.95, agree
    with torch.no_grad():
        x = _logits(results[torch.float32]).log_softmax(-1)
        y = results[torch.bfloat16](input_ids=IDS).logits.float().log_softmax(-1)
    nll = lambda lp: -lp[0, :-1].gather(-1, IDS[0, 1:, None]).mean()  # noqa: E731
    assert abs(float(nll(x) - nll(y))) < 0.1 * abs(float(nll(x)))


def test_the_room_a_block_needs_counts_reconstruction():
    """Block reconstruction holds float32 masters, Adam's moments and gradients of the block and the dense targets:
    the placement's estimate grows by that (so a model that fits for SparseGPT alone can be onloaded with it)."""
    from hf_prune.adapters import ModelAdapter
    from hf_prune.registry import get_method

    model = make_tiny_model("llama")
    adapter = ModelAdapter(model)

    def headroom(step):
        config = Recipe.from_dict({"steps": [step]}).steps[0]
        return placement.calibration_headroom(model, adapter, 8, 64, [get_method(config.method).method_cls(config)])

    plain = headroom({"method": "sparsegpt", "structure": "2:4"})
    refit = headroom({"method": "sparsegpt", "structure": "2:4", "reconstruct": True})
    parameters = sum(p.numel() for p in model.model.layers[0].parameters())
    boundary = 8 * 64 * model.config.hidden_size * 4
    assert plain == placement.calibration_headroom(model, adapter, 8, 64)
    assert refit - plain == 21 * parameters + 2 * boundary
