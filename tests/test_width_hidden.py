"""Hidden-channel (residual-stream) width pruning: channels that carry nothing are removed without changing a logit
(the norms' rescale and Gemma's embedding scale are exact), the saved folder is the family's own class with a
smaller hidden_size that reloads to identical logits, tied embeddings stay tied, and what cannot be expressed is
refused before any work."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter
from hf_prune.errors import RecipeError, UnsupportedModelError
from hf_prune.methods.width.hidden import _norm_offset

from .conftest import make_tiny_model, tiny_config

IDS = torch.randint(0, 3000, (2, 20), generator=torch.Generator().manual_seed(3))
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def _model_with_dead_channels(family: str, dead: torch.Tensor):
    """A tiny model whose stream channels ``dead`` are exactly zero everywhere (embeddings and every writer's rows
    are zero there), norm weights spread so the rescale matters, eps negligible."""
    torch.manual_seed(0)
    config = tiny_config(family)
    config.rms_norm_eps = 1e-12
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.2)
            elif p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
        model.get_input_embeddings().weight[:, dead] = 0
        for ref in ModelAdapter(model).all_linears():
            if ref.role in ("o", "down"):
                ref.module.weight[dead] = 0
    return model


@pytest.mark.parametrize("criterion", ["activation", "fluctuation"])
@pytest.mark.parametrize("family", FAMILIES)
def test_channels_that_carry_nothing_are_removed_without_changing_the_logits(
    family, criterion, tokenizer, tiny_recipe
):
    dead = torch.arange(0, 64, 4)  # 16 of 64 channels
    model = _model_with_dead_channels(family, dead)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", "hidden": 0.25, "criterion": criterion}))
    details = pruner.prune().steps[0].details
    assert pruner.model.config.hidden_size == 48
    assert details["hidden_size"] == {"before": 64, "after": 48}
    # every norm lost a quarter of a stream whose removed part was zero: rescaled by sqrt(64 / 48)
    assert details["hidden_norm_rescale"]["min"] == pytest.approx((64 / 48) ** 0.5, rel=1e-5)
    assert details["hidden_norm_rescale"]["max"] == pytest.approx((64 / 48) ** 0.5, rel=1e-5)
    if family == "gemma3_text":  # embeddings scaled by sqrt(hidden_size): the whole stream follows
        assert details["hidden_embedding_scale"] == pytest.approx((48 / 64) ** 0.5, rel=1e-5)
    with torch.no_grad():
        after = pruner.model(input_ids=IDS).logits
    assert torch.allclose(after, before, atol=1e-4 * before.abs().max().item(), rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_hidden_with_mlp_and_heads_saves_the_familys_own_class(family, tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model(family)
    if family == "llama":  # a tied Llama too (SmolLM2's layout)
        model.config.tie_word_embeddings = True
        model.tie_weights()
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    step = {"method": "width", "hidden": 0.25, "mlp": 0.25, "heads": 0.5}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    pruner.prune()
    pruned = pruner.model
    assert type(pruned) is type(model) and pruned.config.hidden_size == 48
    assert pruned.get_input_embeddings().weight.shape[1] == 48
    assert (pruned.get_input_embeddings().weight is pruned.get_output_embeddings().weight) == tied
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model) and reloaded.config.hidden_size == 48
    assert (reloaded.get_input_embeddings().weight is reloaded.get_output_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruned(input_ids=IDS).logits)
        cached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_least_squares_refits_the_readers_of_the_narrowed_stream(tokenizer, tiny_recipe):
    """Each linear that reads a norm's output (q, k, v, gate, up) gets its kept columns refit on that norm's second
    moment: the calibration error of its output is lower than plain slicing gives, and none is made worse."""
    step = {"method": "width", "hidden": 0.25, "criterion": "activation"}
    refit = HFPruner(make_tiny_model("llama"), tokenizer, tiny_recipe(step)).prune().steps[0].details
    errors = refit["hidden_compensation_error"]
    assert errors["readers"] == 3 * 5 and errors["refit_kept"] > 0
    assert errors["refit_mean"] < errors["plain_mean"]
    plain = HFPruner(make_tiny_model("llama"), tokenizer, tiny_recipe({**step, "compensate": "none"})).prune()
    assert "hidden_compensation_error" not in plain.steps[0].details


def test_a_bf16_model_stays_bf16(tokenizer, tiny_recipe, tmp_path):
    model = make_tiny_model("qwen3").to(torch.bfloat16)
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", "hidden": 0.25}))
    pruner.prune()
    assert {p.dtype for p in pruner.model.parameters()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.hidden_size == 48


@pytest.mark.parametrize(
    "family, step, error, message",
    [
        ("gpt2", {"method": "width", "hidden": 0.25}, UnsupportedModelError, "derives head_dim"),
        ("opt", {"method": "width", "hidden": 0.25}, UnsupportedModelError, "derives head_dim"),
        ("llama", {"method": "width", "hidden": 0.25, "per_block": True}, RecipeError, "per_block"),
        ("llama", {"method": "width", "hidden": 1.0}, RecipeError, "fraction"),
        ("llama", {"method": "width", "hidden": 0.25, "compensate": "bias"}, RecipeError, "bias compensates"),
    ],
)
def test_what_cannot_be_expressed_is_refused_before_any_work(family, step, error, message, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        HFPruner(model, tokenizer, tiny_recipe(step)).prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_layer_norm_is_not_taken_for_an_rms_norm():
    norm = nn.LayerNorm(16)
    with pytest.raises(UnsupportedModelError, match="not an RMS norm"):
        _norm_offset(norm, "norm", norm.weight.detach())
    rms = nn.RMSNorm(16, eps=1e-6)
    assert _norm_offset(rms, "norm", rms.weight.detach()) == 0


def test_the_width_is_one_the_config_accepts(tokenizer, tiny_recipe, tmp_path):
    """LlamaConfig wants hidden_size to be a multiple of num_attention_heads (SmolLM2: 9 heads), head_dim given or
    not: the kept width is the widest multiple of round_to at or below the fraction that it accepts."""
    config = tiny_config("llama")
    config.update(dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    step = {"method": "width", "hidden": 0.1, "round_to": 1}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    pruner.prune()
    assert pruner.model.config.hidden_size == 63  # 64 = floor(0.9 * 72) is not a multiple of 9
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


@pytest.mark.parametrize(
    "first", [{"method": "depth", "num_blocks": 1}, {"method": "width", "mlp": 0.25}], ids=["depth", "width"]
)
def test_hidden_after_another_structural_step(first, tokenizer, tiny_recipe, tmp_path):
    """A later step plans on the model the earlier one left (fewer blocks, narrower MLPs), not on the loaded one."""
    recipe = tiny_recipe(first)
    recipe["steps"].append({"method": "width", "hidden": 0.25})
    pruner = HFPruner(make_tiny_model("llama"), tokenizer, recipe)
    pruner.prune()
    config = pruner.model.config
    assert config.hidden_size == 48
    expected = (2, 128) if first["method"] == "depth" else (3, 96)
    assert (config.num_hidden_layers, config.intermediate_size) == expected
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


def test_the_second_moments_wait_for_the_refit_outside_memory(tokenizer, tiny_recipe, monkeypatch):
    """Each read norm's second moment leaves memory when its block is done (an unnamed temporary file when big) and
    comes back one norm at a time for its readers' refit: the same weights as moments held in memory."""
    from hf_prune.utils import OffloadedCopy

    step = {"method": "width", "hidden": 0.25, "criterion": "activation"}
    in_memory = make_tiny_model("llama")
    HFPruner(in_memory, tokenizer, tiny_recipe(step)).prune()
    files = []
    original = OffloadedCopy.__init__

    def to_a_file(self, tensor, file_bytes=None):
        original(self, tensor, file_bytes=0)
        files.append(self._file is not None)

    monkeypatch.setattr(OffloadedCopy, "__init__", to_a_file)
    spilled = make_tiny_model("llama")
    HFPruner(spilled, tokenizer, tiny_recipe(step)).prune()
    assert len(files) == 3 * 2 and all(files)  # both read norms of every block
    for (name, p), q in zip(spilled.named_parameters(), in_memory.parameters()):
        assert torch.equal(p, q), name
