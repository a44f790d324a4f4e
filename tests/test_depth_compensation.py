"""Depth with least-squares compensation (ReplaceMe): the map is the identity when nothing is removed, folding it is
exact, it lowers the replaced run's calibration error on a real SmolLM2, and the result is a plain checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.errors import RecipeError
from hf_prune.methods.depth.compensation import RunStatistics, fit_map, fold_into_writer, squared_error
from hf_prune.methods.depth.method import removed_runs
from hf_prune.methods.depth.writers import mlp_writer

from .conftest import MOE_FAMILIES, TINY_WIDTHS, VOCAB, make_tiny_model, tiny_config

IDS = torch.randint(0, 3000, (1, 20), generator=torch.Generator().manual_seed(3))


def test_removing_zero_blocks_gives_the_identity():
    """No block between the writer and the run's end: L = Y + M, so the least-squares map is I."""
    torch.manual_seed(0)
    m, x = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    st = RunStatistics(16, torch.device("cpu"))
    st.update(m, x, x)  # the run's output equals its input: nothing removed
    T = fit_map(st.G, st.C, damp=0.0)
    assert torch.allclose(T, torch.eye(16, dtype=T.dtype), atol=1e-6)
    assert abs(squared_error(st.G, st.C, st.b_sq, T)) < 1e-6 * st.b_sq


def test_the_fit_recovers_a_linear_run_and_folding_is_exact():
    torch.manual_seed(0)
    A = torch.eye(8) + 0.1 * torch.randn(8, 8)
    m, y = torch.randn(1, 256, 8), torch.randn(1, 256, 8)
    st = RunStatistics(8, torch.device("cpu"))
    st.update(m, y + m, y + m @ A)  # the removed run maps M to M A
    T = fit_map(st.G, st.C, damp=0.0)
    assert torch.allclose(T.float(), A, atol=1e-4)
    assert squared_error(st.G, st.C, st.b_sq, T) < 1e-6 * squared_error(st.G, st.C, st.b_sq, None)
    W, b, h = torch.randn(8, 5), torch.randn(8), torch.randn(3, 5)
    new_w, new_b = fold_into_writer(W, b, T)
    assert torch.allclose(h @ new_w.t() + new_b, (h @ W.t() + b) @ T.float(), atol=1e-4)


def test_the_relative_fit_is_least_squares_weighted_by_each_tokens_norm():
    """relative: token t's squared error divided by ||L_t||^2. One token with a massive stream (an attention sink)
    decides the plain fit; the relative fit is the weighted closed form and finds the map the other tokens follow."""
    torch.manual_seed(0)
    A, B = torch.eye(8) + 0.1 * torch.randn(8, 8), torch.eye(8) + 0.1 * torch.randn(8, 8)
    m, y = torch.randn(1, 256, 8), torch.randn(1, 256, 8)
    out = y + m @ A
    out[0, 0] = 1e3 * (y[0, 0] + m[0, 0] @ B)  # one massive token that follows another map
    m_big = m.clone()
    m_big[0, 0] *= 1e3
    y_big = y.clone()
    y_big[0, 0] *= 1e3
    plain, relative = RunStatistics(8, torch.device("cpu")), RunStatistics(8, torch.device("cpu"), relative=True)
    for st in (plain, relative):
        st.update(m_big, y_big + m_big, out)
    T_plain, T_rel = fit_map(plain.G, plain.C, damp=0.0), fit_map(relative.G, relative.C, damp=0.0)
    M, Bv = m_big.reshape(-1, 8).double(), (out - y_big).reshape(-1, 8).double()
    w = 1 / out.reshape(-1, 8).double().pow(2).sum(-1, keepdim=True)
    expected = torch.linalg.solve(M.t() @ (w * M), M.t() @ (w * Bv))
    assert torch.allclose(T_rel, expected, atol=1e-4)
    assert (T_rel.float() - A).abs().max() < 0.05 < (T_plain.float() - A).abs().max()
    assert relative.l_sq == pytest.approx(256, rel=1e-5)  # the error is per token, relative to its norm


def test_runs():
    assert removed_runs([7, 2, 3, 9, 8]) == [(2, 3), (7, 9)]


@pytest.mark.parametrize("compensate", ["least_squares", "relative_least_squares"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_compensated_depth_saves_a_plain_checkpoint(family, compensate, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family, layers=4)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "depth", "blocks": [0, 2], "compensate": compensate}))
    report = pruner.prune()
    entries = report.steps[0].details["compensation"]
    assert [e["blocks"] for e in entries] == [[0, 0], [2, 2]]
    assert entries[0]["compensated"] is False and "no kept block" in entries[0]["why"]
    assert entries[1]["error_compensated"] <= entries[1]["error_removed"]
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits, atol=1e-5)
    assert reloaded.config.num_hidden_layers == 2


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_folding_into_a_mixture_of_experts_is_exact(family):
    """Every routed expert's down matrix (fused, transposed, per-expert linears), their biases and the shared
    experts' down projections fold the map: the MoE module's output becomes exactly its old output times T."""
    from hf_prune.adapters import ModelAdapter

    model = make_tiny_model(family, layers=3)
    adapter = ModelAdapter(model)
    index = adapter.moe_blocks()[-1]
    writer = mlp_writer(adapter, index)
    assert writer.experts, "the routed experts' down matrices are part of the writer"
    x = torch.randn(2, 7, TINY_WIDTHS["hidden_size"], generator=torch.Generator().manual_seed(0))

    def output():
        out = writer.module(x)
        return (out[0] if isinstance(out, tuple) else out).detach()

    with torch.no_grad():
        before = output()
        T = torch.eye(x.shape[-1]) + 0.1 * torch.randn(x.shape[-1], x.shape[-1])
        writer.fold(T)
        after = output()
    assert torch.allclose(after, before @ T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_compensated_depth_on_a_mixture_of_experts_saves_a_plain_checkpoint(family, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family, layers=4)
    step = {"method": "depth", "blocks": [2], "compensate": "least_squares"}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    (entry,) = pruner.prune().steps[0].details["compensation"]
    assert entry["writer"] == "model.layers.1.mlp"
    assert entry["compensated"] and entry["error_compensated"] < entry["error_removed"]
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits, atol=1e-5)
    assert reloaded.config.num_hidden_layers == 3


@pytest.mark.parametrize("family", ["gemma3_text"])
def test_families_it_cannot_fold_into_are_refused_before_any_work(family, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="least_squares does not support"):
        HFPruner(
            model, tokenizer, tiny_recipe({"method": "depth", "num_blocks": 1, "compensate": "least_squares"})
        ).prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.real_model
def test_the_map_lowers_the_replaced_runs_error_on_smollm2(smollm2_path, tokenizer, tiny_recipe):
    pruner = HFPruner.from_pretrained(
        smollm2_path,
        recipe=tiny_recipe(
            {"method": "depth", "num_blocks": 6, "compensate": "least_squares"}, nsamples=8, seqlen=128
        ),
    )
    entries = pruner.prune().steps[0].details["compensation"]
    assert entries and all(e["compensated"] for e in entries)
    assert all(e["error_compensated"] < 0.8 * e["error_removed"] for e in entries)


def test_scaled_or_post_norm_residuals_are_refused(tokenizer, tiny_recipe):
    from transformers import GraniteConfig

    step = {"method": "depth", "num_blocks": 1, "compensate": "least_squares"}
    granite = GraniteConfig(vocab_size=VOCAB, num_key_value_heads=2, residual_multiplier=0.22, **TINY_WIDTHS)
    with pytest.raises(RecipeError, match="residual branch is scaled"):
        HFPruner(AutoModelForCausalLM.from_config(granite), tokenizer, tiny_recipe(step)).prune()
    post_norm_opt = tiny_config("opt")
    post_norm_opt.do_layer_norm_before = False
    with pytest.raises(RecipeError, match="normalize after the residual"):
        HFPruner(AutoModelForCausalLM.from_config(post_norm_opt), tokenizer, tiny_recipe(step)).prune()


def test_compensated_depth_on_an_onloaded_mixture_of_experts_equals_in_memory(tokenizer, tiny_recipe, tmp_path):
    """gpt-oss (fused, transposed experts with a fused down bias): onloading replaces the block's parameters while it
    is materialized, and the fold must reach the ones it writes back (the bias included)."""
    step = {"method": "depth", "blocks": [2], "compensate": "least_squares"}
    memory = HFPruner(make_tiny_model("gpt_oss", layers=4), tokenizer, tiny_recipe(step))
    memory.prune()
    onloaded = HFPruner(
        make_tiny_model("gpt_oss", layers=4), tokenizer, {**tiny_recipe(step), "onload": True, "device": "cpu"}
    )
    onloaded.prune()
    a = AutoModelForCausalLM.from_pretrained(memory.save_pretrained(tmp_path / "a")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(onloaded.save_pretrained(tmp_path / "b")).state_dict()
    bias = next(k for k in a if k.startswith("model.layers.1.") and k.endswith("down_proj_bias"))
    assert not torch.equal(a[bias], make_tiny_model("gpt_oss", layers=4).state_dict()[bias])  # folded
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_residual_scaled_under_an_unknown_key_is_refused_before_any_change(tokenizer, tiny_recipe, monkeypatch):
    """The fold assumes output = input + attention + MLP; a family that scales its branches under a name hf_prune
    does not know (here: Granite's multiplier, with the key check removed) is caught on the calibration data."""
    from transformers import GraniteConfig

    from hf_prune.errors import UnsupportedModelError
    from hf_prune.methods.depth import method as depth

    monkeypatch.setattr(depth, "_why_not_compensable", lambda ctx: None)
    config = GraniteConfig(vocab_size=VOCAB, num_key_value_heads=2, residual_multiplier=0.22, **TINY_WIDTHS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = {"method": "depth", "blocks": [1], "compensate": "least_squares"}
    with pytest.raises(UnsupportedModelError, match="not its input plus its attention and MLP"):
        HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
