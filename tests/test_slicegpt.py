"""SliceGPT: slicing 0 is the identity, rotations are orthogonal, both save modes reload with identical logits and
generate with the KV cache; unsupported families are refused with the reason."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, Recipe
from hf_prune.adapters import ModelAdapter
from hf_prune.errors import RecipeError, UnsupportedModelError
from hf_prune.methods.slicegpt import rotation as R
from hf_prune.methods.slicegpt.method import SliceGPTConfig, SliceGPTMethod
from hf_prune.pruner import load_model_and_tokenizer

from .conftest import VOCAB, make_tiny_model

SLICEABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "opt"]
IDS = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(0))


def _slice(family, tokenizer, tiny_recipe, slicing, rotation, layers=3):
    model = make_tiny_model(family, layers=layers)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    pruner = HFPruner(
        model, tokenizer, tiny_recipe({"method": "slicegpt", "slicing": slicing, "rotation": rotation}, nsamples=6)
    )
    report = pruner.prune()
    return pruner, report, dense


@pytest.mark.parametrize("family", SLICEABLE)
@pytest.mark.parametrize("rotation", ["per_block", "shared"])
def test_slicing_zero_gives_the_dense_logits(family, rotation, tokenizer, tiny_recipe):
    pruner, report, dense = _slice(family, tokenizer, tiny_recipe, 0.0, rotation)
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(input_ids=IDS).logits, dense, rtol=1e-4, atol=1e-4)
    assert report.steps[0].details["hidden_size"] == [64, 64]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rotation_invariant_preparation_keeps_outputs(family):
    model = make_tiny_model(family)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        SliceGPTMethod(SliceGPTConfig()).make_rotation_invariant(model, ModelAdapter(model))
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4)
    assert (
        all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in (model.model.layers[0].input_layernorm,))
        if family == "llama"
        else True
    )


def test_rotations_are_orthogonal_and_sorted():
    x = torch.randn(500, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    Q, values = R.principal_basis(x.t() @ x)
    torch.testing.assert_close(Q.t() @ Q, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (values[:-1] >= values[1:]).all()
    Q2, _ = R.principal_basis((x + 1).t() @ (x + 1))
    T = R.shortcut(Q, Q2)
    torch.testing.assert_close(T.t() @ T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-10)
    assert R.sliced_dim(576, 0.25) == 432 and R.sliced_dim(576, 0.3, 8) == 400 and R.sliced_dim(64, 0.0) == 64


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_per_block_shortcuts_are_exact_when_the_bases_span_one_subspace(family, monkeypatch, tokenizer, tiny_recipe):
    # Per-block bases that are different orthonormal bases of the SAME kept subspace slice nothing more than one
    # shared basis: with the shortcut matrices between them, the sliced model must give the shared model's logits.
    # This checks the per-block machinery (rotations, d' x d' shortcuts, the MLP's own basis) at slicing > 0.
    shared, _, _ = _slice(family, tokenizer, tiny_recipe, 0.25, "shared")

    def rotated_shared_bases(self, engine, adapter, kept):
        Q = self.shared_basis(engine)[:, :kept]
        g = torch.Generator().manual_seed(0)

        def rotated():
            return Q @ torch.linalg.qr(torch.randn(kept, kept, generator=g, dtype=torch.float64))[0]

        return [rotated() for _ in range(adapter.num_blocks + 1)], [rotated() for _ in range(adapter.num_blocks)]

    monkeypatch.setattr(SliceGPTMethod, "per_block_bases", rotated_shared_bases)
    per_block, report, _ = _slice(family, tokenizer, tiny_recipe, 0.25, "per_block")
    assert report.steps[0].details["hidden_size"] == [64, 48]
    assert hasattr(ModelAdapter(per_block.model).blocks[0], "hf_prune_shortcut")
    with torch.no_grad():
        torch.testing.assert_close(
            per_block.model(input_ids=IDS).logits, shared.model(input_ids=IDS).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "opt"])
def test_per_block_saves_with_modeling_file_and_reloads_identically(family, tmp_path, tokenizer, tiny_recipe):
    pruner, report, _ = _slice(family, tokenizer, tiny_recipe, 0.25, "per_block")
    assert report.steps[0].details["hidden_size"] == [64, 48]
    out = pruner.save_pretrained(tmp_path / "sliced")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"hf_prune_sliced_{family}" and "AutoModelForCausalLM" in config["auto_map"]
    assert (out / "modeling_hf_prune_sliced.py").exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)  # never silently loaded as the plain base class
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = load_model_and_tokenizer(str(out))  # hf_prune loads it with its own copy of the code
    with torch.no_grad():
        expected = pruner.model(input_ids=IDS).logits
        assert torch.equal(remote(input_ids=IDS).logits, expected)
        assert torch.equal(ours(input_ids=IDS).logits, expected)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(
            remote.generate(IDS[:1], use_cache=True, **kwargs), remote.generate(IDS[:1], use_cache=False, **kwargs)
        )

    def block_params(model):
        return sum(p.numel() for p in ModelAdapter(model).blocks.parameters())

    assert block_params(remote) < block_params(make_tiny_model(family))


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_shared_rotation_is_a_plain_smaller_model(family, tmp_path, tokenizer, tiny_recipe):
    pruner, report, _ = _slice(family, tokenizer, tiny_recipe, 0.25, "shared")
    out = pruner.save_pretrained(tmp_path / "shared")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and config["hidden_size"] == 48
    assert config["head_dim"] == 16 and not config["tie_word_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(
            reloaded.generate(IDS[:1], use_cache=True, **kwargs), reloaded.generate(IDS[:1], use_cache=False, **kwargs)
        )
    assert report.steps[0].details["saved_as"] == "plain transformers class"
    tied = make_tiny_model(family).config.tie_word_embeddings
    assert any("untied" in n for n in report.steps[0].details["notes"]) == bool(tied)


def test_shared_rotation_rounds_to_a_hidden_size_the_config_accepts(tmp_path, tokenizer, tiny_recipe):
    # SmolLM2's head layout in small: 9 heads of 16, so LlamaConfig wants hidden_size % 9 == 0; 25% slicing of 144
    # gives 108 -> 104 (multiple of 8), which LlamaConfig rejects: the largest accepted multiple of 8 below is 72.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=144, intermediate_size=160, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "slicegpt", "slicing": 0.25, "rotation": "shared"}))
    details = pruner.prune().steps[0].details
    assert details["hidden_size"] == [144, 72]
    assert any("instead of 104" in n and "multiple of the number of attention heads" in n for n in details["notes"])
    out = pruner.save_pretrained(tmp_path / "shared")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # the plain class accepts it
    assert reloaded.config.hidden_size == 72
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


def test_shared_rotation_on_opt_needs_the_modeling_file(tmp_path, tokenizer, tiny_recipe):
    pruner, report, _ = _slice("opt", tokenizer, tiny_recipe, 0.25, "shared")
    assert report.steps[0].details["saved_as"].startswith("modeling file")
    out = pruner.save_pretrained(tmp_path / "opt")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, pruner.model(input_ids=IDS).logits)


@pytest.mark.parametrize("family,reason", [("gemma3_text", "sandwich"), ("gpt2", "head sizes")])
def test_unsupported_families_say_why(family, reason, tokenizer, tiny_recipe):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=reason):
        HFPruner(model, tokenizer, tiny_recipe({"method": "slicegpt", "slicing": 0.25})).prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_slicing_values():
    for bad in (1.0, -0.1, "quarter"):
        with pytest.raises(RecipeError, match="slicing"):
            Recipe.from_dict({"steps": [{"method": "slicegpt", "slicing": bad}]})
    with pytest.raises(RecipeError, match="rotation"):
        Recipe.from_dict({"steps": [{"method": "slicegpt", "rotation": "global"}]})
