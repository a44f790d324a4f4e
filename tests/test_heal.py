"""Healing with PEFT keeps the sparsity through training, merge, save and reload; loss goes down; distillation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.errors import HFPruneError
from hf_prune.heal import kd_loss, kd_loss_topk, load_healing_adapter
from hf_prune.heal.distill import teacher_topk
from hf_prune.pruning.masks import nm_violations

from .conftest import make_tiny_model

HEAL = {"max_steps": 6, "batch_size": 2, "seqlen": 32, "lr": 1e-2, "lora_r": 4, "warmup_steps": 1}


def _zero_masks(model):
    return {r.name: weight_out_in(r.module) == 0 for r in ModelAdapter(model).all_linears()}


@pytest.fixture
def heal_source(calib_texts):
    return {"source": calib_texts}


@pytest.mark.parametrize("family,mask", [("llama", "masked_lora"), ("gpt2", "masked_lora"), ("qwen2", "shira")])
def test_nm_pattern_exact_after_heal_merge_save_reload(family, mask, tmp_path, tokenizer, tiny_recipe, heal_source):
    model = make_tiny_model(family)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:4"}))
    pruner.prune()
    before = _zero_masks(model)
    dense_before = {r.name: weight_out_in(r.module).clone() for r in ModelAdapter(model).all_linears()}
    summary = pruner.heal(mask=mask, **HEAL, **heal_source)
    assert summary["mask"] == mask and summary["sparsity_preserved"] is True and summary["merged"]
    assert summary["trainable_params"] > 0
    changed = 0
    for ref in ModelAdapter(pruner.model).all_linears():
        w = weight_out_in(ref.module)
        assert torch.equal(w == 0, before[ref.name])
        assert nm_violations(w, 2, 4) == 0
        changed += int((w != dense_before[ref.name]).sum())
    assert changed > 0  # the healing did update the surviving weights
    out = pruner.save_pretrained(tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, mask_ in before.items():
        assert torch.equal(weight_out_in(reloaded.get_submodule(name)) == 0, mask_)
    assert json.loads((out / "config.json").read_text())["pruning_config"]["heal"]["mask"] == mask


def test_plain_lora_merge_would_destroy_sparsity_but_masked_does_not(tokenizer, tiny_recipe, heal_source):
    """The failure users report (sparsity 0.50 -> 0.00 after merge_and_unload) reproduced with mask: none."""
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5}))
    pruner.prune()
    pruner.heal(mask="none", **HEAL, **heal_source)
    w = weight_out_in(pruner.model.model.layers[0].mlp.up_proj)
    assert float((w == 0).float().mean()) < 0.01


def test_loss_goes_down(tokenizer, tiny_recipe, calib_texts):
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "sparsity": 0.5}))
    pruner.prune()
    cfg = {**HEAL, "max_steps": 30, "lr": 5e-3, "source": calib_texts[:20]}  # few windows, cycled: it must fit them
    summary = pruner.heal(**cfg)
    assert summary["loss_last10"] < summary["loss_first10"] - 0.1


def test_distillation_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 7, 50)
    assert float(kd_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    values, indices = teacher_topk(logits, 8)
    assert float(kd_loss_topk(logits, values, indices, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    assert float(kd_loss(other, logits, 2.0)) > 0.01
    assert float(kd_loss_topk(other, values, indices, 2.0)) > 0.01


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_distillation_from_an_identical_teacher_starts_at_zero(cache, tokenizer, tiny_recipe, heal_source):
    """alpha = 1: the loss is pure KD; the student starts equal to the teacher, so the first loss is 0."""
    teacher = make_tiny_model("llama")
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, {"steps": []})
    summary = pruner.heal(
        teacher=teacher,
        mask="none",
        distill=True,
        distill_alpha=1.0,
        teacher_cache=cache,
        **{**HEAL, "max_steps": 2, "lr": 1e-6},
        **heal_source,
    )
    assert summary["distill"] and summary["loss_first10"] < 0.05


def test_distillation_after_pruning_uses_the_source_model(tmp_path, tokenizer, tiny_recipe, heal_source):
    src = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    pruner = HFPruner.from_pretrained(str(src), recipe=tiny_recipe({"method": "wanda", "sparsity": 0.5}))
    pruner.prune()
    summary = pruner.heal(distill=True, **HEAL, **heal_source)
    assert summary["distill"] and summary["sparsity_preserved"]


def test_unpruned_model_refuses_masks(tokenizer, heal_source):
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, {"steps": []})
    with pytest.raises(HFPruneError, match="no weight pruning to keep"):
        pruner.heal(mask="masked_lora", **HEAL, **heal_source)
    assert pruner.heal(mask="auto", **HEAL, **heal_source)["mask"] == "none"  # depth/width/dense: plain LoRA


def test_unmerged_adapter_saved_peft_style_and_reloaded_sparse(tmp_path, tokenizer, tiny_recipe, heal_source):
    model = make_tiny_model("llama")
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "wanda", "structure": "2:4"}))
    pruner.prune()
    before = _zero_masks(model)
    pruner.heal(merge=False, **HEAL, **heal_source)
    ids = torch.randint(0, 3000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pruner._peft_model(input_ids=ids).logits
    out = pruner.save_pretrained(tmp_path / "unmerged")
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "hf_prune_heal.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out)  # the pruned base, still exactly sparse
    for name, mask_ in before.items():
        assert torch.equal(weight_out_in(base.get_submodule(name)) == 0, mask_)
    healed = load_healing_adapter(base, out)
    with torch.no_grad():
        torch.testing.assert_close(healed(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = healed.merge_and_unload()
    for name, mask_ in before.items():
        assert torch.equal(weight_out_in(merged.get_submodule(name)) == 0, mask_)


def test_recipe_heal_section_runs_from_the_cli(tmp_path, tokenizer, calib_texts):
    import json as _json

    from hf_prune.cli import main

    src = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(_json.dumps({"text": t}) for t in calib_texts[:200]) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {src}
calibration: {{source: {text}, nsamples: 4, seqlen: 32}}
steps: [{{method: wanda, structure: "2:4"}}]
heal: {{max_steps: 3, batch_size: 2, seqlen: 32, source: {text}}}
output: {{dir: {tmp_path / "out"}}}
""")
    assert main(["run", str(recipe)]) == 0
    cfg = _json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["pruning_config"]["heal"]["sparsity_preserved"] is True


def test_masked_update_equals_plain_autograd_without_keeping_the_delta():
    """The autograd function gives the gradients of x @ ((B A) s * K)^T and saves only x, A, B and the mask."""
    from hf_prune.heal.adapters import MaskedLowRankUpdate

    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    A = torch.randn(4, 12, requires_grad=True)
    B = torch.randn(8, 4, requires_grad=True)
    mask = torch.rand(8, 12) > 0.5
    plain = torch.nn.functional.linear(x, (B @ A) * 0.5 * mask)
    g = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, (x, A, B), g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = MaskedLowRankUpdate.apply(x, A, B, mask, 0.5)
    got = torch.autograd.grad(y, (x, A, B), g)
    assert torch.allclose(y, plain, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, expected))
    assert (8, 12) in saved and saved.count((8, 12)) == 1  # the mask only: no dense delta kept
