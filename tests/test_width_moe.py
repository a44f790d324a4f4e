"""MLP width of mixture-of-experts models: every routed expert narrows to one width with its own neurons (scored on
the tokens routed to it), its down projection refit by least squares; shared experts and dense blocks narrow as
MLPs; the saved folder is the family's own class and reloads to identical logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter
from hf_prune.errors import UnsupportedModelError

from .conftest import MOE_FAMILIES, make_tiny_model

IDS = torch.randint(0, 3000, (2, 20), generator=torch.Generator().manual_seed(3))
HEADS_REFUSED = ("olmoe", "deepseek_v3")  # tested in test_width: refused before any work
HIDDEN_REFUSED = {  # their configs derive head_dim from hidden_size
    "olmoe": "config cannot describe the narrowed model",
    "deepseek_v3": "derives head_dim from hidden_size",
}


def _expert_widths(model) -> dict[int, int]:
    adapter = ModelAdapter(model)
    return {
        i: next(r for r in adapter.experts(i) if r.role == "expert_down").in_features for i in adapter.moe_blocks()
    }


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family_narrows_its_experts_into_its_own_class(family, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family)
    before = _expert_widths(model)
    before_sinks = model.model.layers[0].self_attn.sinks.detach().clone() if family == "gpt_oss" else None
    step = {"method": "width", "mlp": 0.25, **({} if family in HEADS_REFUSED else {"heads": 0.5})}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    details = pruner.prune().steps[0].details
    pruned = pruner.model
    assert type(pruned) is type(model)
    assert _expert_widths(pruned) == {i: 3 * w // 4 for i, w in before.items()}  # 32 -> 24 in every MoE block
    assert details["expert_width"] == _expert_widths(pruned)
    if family == "gpt_oss":  # one attention sink per query head: the kept heads keep theirs
        sinks = pruned.model.layers[0].self_attn.sinks
        assert sinks.shape == (pruned.config.num_attention_heads,) == (2,)
        assert all(bool((before_sinks == v).any()) for v in sinks)
    for block in details["compensation_error"].values():  # the down refit never worse than slicing
        experts = block.get("experts")
        if experts and "refit_mean" in experts:
            assert experts["refit_mean"] <= experts["plain_mean"]
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _expert_widths(reloaded) == _expert_widths(pruned)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruned(input_ids=IDS).logits)
        cached = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])  # concatenated / interleaved+bias / T
def test_each_expert_keeps_its_own_neurons(family, tokenizer, tiny_recipe):
    """Each expert has 8 of its 32 neurons whose down columns are zero, a different 8 per expert (and a quarter of
    every dense or shared MLP's): cutting a quarter by magnitude without compensation removes exactly those, so no
    output changes."""
    model = make_tiny_model(family)
    adapter = ModelAdapter(model)
    with torch.no_grad():
        for i in adapter.moe_blocks():
            for ref in adapter.experts(i):
                if ref.role == "expert_down":
                    dead = torch.randperm(32, generator=torch.Generator().manual_seed(ref.expert + 10 * i))[:8]
                    ref.weight()[:, dead] = 0
        for ref in adapter.all_linears():
            if ref.role in ("down", "shared_down"):
                width = ref.in_features
                ref.weight()[:, torch.randperm(width, generator=torch.Generator().manual_seed(1))[: width // 4]] = 0
        before = model(input_ids=IDS).logits
    step = {"method": "width", "mlp": 0.25, "criterion": "magnitude", "compensate": "none"}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    pruner.prune()
    assert set(_expert_widths(pruner.model).values()) == {24}
    with torch.no_grad():
        after = pruner.model(input_ids=IDS).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hidden_channels_of_every_moe_family_or_a_refusal_first(family, tokenizer, tiny_recipe, tmp_path):
    """The stream narrows through the routed experts (fused, transposed or not, with biases), the routers and the
    shared experts, with the expert width in the same step; the saved folder is the family's own class."""
    model = make_tiny_model(family)
    step = {"method": "width", "hidden": 0.25, "mlp": 0.25, "criterion": "fluctuation"}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    if family in HIDDEN_REFUSED:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UnsupportedModelError, match=HIDDEN_REFUSED[family]):
            pruner.prune()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        return
    widths = _expert_widths(model)
    details = pruner.prune().steps[0].details
    if family == "qwen2_moe":  # q, k, v and the shared expert's gate, up and gate, which read a view of the norm
        assert details["hidden_compensation_error"]["readers"] == 6 * 3
    pruned = pruner.model
    assert type(pruned) is type(model) and pruned.config.get_text_config().hidden_size == 48
    assert _expert_widths(pruned) == {i: 3 * w // 4 for i, w in widths.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruned(input_ids=IDS).logits)
        cached = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(IDS[:1], max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # experts stored (E, out, in) / transposed (E, in, out)
def test_an_moe_module_adds_its_experts_and_router_columns_to_the_norm_it_reads(family):
    """Fluctuation and magnitude weigh each stream channel by the squared norms of the columns that read it: for the
    norm before an MoE module, every routed expert's first matrix and the router, over the stream's dimension."""
    from hf_prune.methods.width.hidden import StreamRecorder, stream_sites

    model = make_tiny_model(family)
    adapter = ModelAdapter(model)
    sites = stream_sites(model, adapter, model)
    block = adapter.blocks[0]
    experts = block.mlp.experts.gate_up_proj.detach()
    router = block.get_submodule(adapter.moe_spec(0).router).weight.detach()
    other = 2 if family == "gpt_oss" else 1  # the axis of one expert's matrix that is not the stream's
    expected = experts.double().pow(2).sum((0, other)) + router.double().pow(2).sum(0)
    recorder = StreamRecorder(sites)
    x = torch.randn(1, 4, model.config.hidden_size)
    recorder._last_norm_output["model.layers.0.post_attention_layernorm"] = x
    recorder._moe_reader("model.layers.0.mlp", block.mlp, x)
    got = recorder.reader_columns["model.layers.0.post_attention_layernorm"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
