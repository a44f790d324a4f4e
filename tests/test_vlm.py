"""Vision-language models: visual-token pruning through generate() on every family, and weight pruning of the
language model with image+text calibration."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, weight_out_in
from hf_prune.errors import HFPruneError, RecipeError
from hf_prune.pruner import load_pretrained
from hf_prune.vlm import enable_visual_token_pruning
from hf_prune.vlm.selection import budget, max_min_diverse

from .vlm_models import CLIP, N_IMAGE, VLM_FAMILIES, tiny_vlm

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _lm_lengths(model):
    """Sequence length seen by each language-model block in the next forward."""
    seen, handles = {}, []

    def recorder(i):
        def hook(module, args, kwargs):
            seen.setdefault(i, (args[0] if args else kwargs["hidden_states"]).shape[1])

        return hook

    for i, block in enumerate(ModelAdapter(model).blocks):
        handles.append(block.register_forward_pre_hook(recorder(i), with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("strategy", ["fastv", "divprune"])
def test_token_budget_cache_and_identity(family, strategy):
    model, ids, extra = tiny_vlm(family)
    with torch.no_grad():
        dense_logits = model(input_ids=ids, **extra).logits
        dense_tokens = model.generate(input_ids=ids, **extra, **GEN)
        pruner = enable_visual_token_pruning(model, strategy, keep=1.0)
        assert torch.equal(model.generate(input_ids=ids, **extra, **GEN), dense_tokens)  # 100% budget: unchanged
        torch.testing.assert_close(model(input_ids=ids, **extra).logits, dense_logits, rtol=1e-5, atol=1e-5)
        enable_visual_token_pruning(model, strategy, keep=0.25)
        seen, handles = _lm_lengths(model)
        model(input_ids=ids, **extra)
        for h in handles:
            h.remove()
        k = pruner.k if strategy == "fastv" else 0
        assert seen[len(seen) - 1] == ids.shape[1] - N_IMAGE + 4  # exactly the budget of image tokens is kept
        assert seen[0] == (ids.shape[1] if k > 0 else ids.shape[1] - N_IMAGE + 4)
        with_cache = model.generate(input_ids=ids, **extra, use_cache=True, **GEN)
        without = model.generate(input_ids=ids, **extra, use_cache=False, **GEN)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("strategy", ["random", "uniform"])
def test_baselines_keep_a_count(strategy):
    model, ids, extra = tiny_vlm("llava")
    with torch.no_grad():
        pruner = enable_visual_token_pruning(model, strategy, keep=5)
        seen, handles = _lm_lengths(model)
        a = model.generate(input_ids=ids, **extra, use_cache=True, **GEN)
        b = model.generate(input_ids=ids, **extra, use_cache=False, **GEN)
    assert pruner.last_kept == 5 and torch.equal(a, b)
    pruner.disable()
    with torch.no_grad():
        model(input_ids=ids, **extra)
    assert not hasattr(model, "_hf_prune_visual_tokens")


def test_divprune_never_picks_duplicates_while_distinct_tokens_remain():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    features = torch.cat([base, base, base[:2]])  # 14 tokens, only 6 distinct
    chosen = max_min_diverse(features, 6)
    assert len({tuple(features[i].tolist()) for i in chosen}) == 6
    assert budget(576, 0.1) == 58 and budget(10, 3) == 3 and budget(10, 0.01) == 1 and budget(4, 10) == 4


def test_divprune_on_duplicated_image_tokens_in_the_model():
    model, ids, extra = tiny_vlm("llava")
    extra = {"pixel_values": torch.zeros_like(extra["pixel_values"])}  # a blank image: identical patch embeddings
    captured = {}
    pruner = enable_visual_token_pruning(model, "divprune", keep=4)
    original = pruner._select

    def spy(hidden, step):
        index = original(hidden, step)
        captured["kept_image"] = [i for i in index[0].tolist() if i in step["image_positions"][0].tolist()]
        captured["hidden"] = hidden
        return index

    pruner._select = spy
    with torch.no_grad():
        model(input_ids=ids, **extra)
    assert len(captured["kept_image"]) == 4


def test_fastv_needs_a_layer_after_the_first():
    model, _, _ = tiny_vlm("llava")
    with pytest.raises(HFPruneError, match="layer >= 1"):
        enable_visual_token_pruning(model, "fastv", keep=0.5, layer=0)


def _tiny_llava_with_processor(tokenizer):
    import transformers as T

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**CLIP),
        text_config=T.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return model, processor


def _saved_reloads_to_the_same_logits(pruner, processor, folder):
    """Save, reload with AutoModelForImageTextToText, and compare logits on an image + text prompt."""
    out = pruner.save_pretrained(folder)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = processor(
        images=[torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()], text=["<image>\nHello"], return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, pruner.model(**inputs).logits)
    return out


def test_weight_pruning_of_the_language_model_with_image_calibration(tmp_path, tokenizer):
    model, processor = _tiny_llava_with_processor(tokenizer)
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    recipe = {
        "calibration": {"source": "skimage", "nsamples": 3, "seqlen": 24},
        "steps": [{"method": "wanda", "structure": "2:4"}],
    }
    pruner = HFPruner(model, recipe=recipe, processor=processor)
    report = pruner.prune()
    assert report.calibration["images"] and report.calibration["nsamples"] == 3
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vision_before.items())
    assert all(torch.equal(v, model.model.multi_modal_projector.state_dict()[k]) for k, v in projector_before.items())
    for ref in ModelAdapter(model).all_linears():
        assert ref.name.startswith("model.language_model.layers.")
        assert int((weight_out_in(ref.module) == 0).sum()) == weight_out_in(ref.module).numel() // 2
    out = _saved_reloads_to_the_same_logits(pruner, processor, tmp_path / "vlm")
    assert (out / "preprocessor_config.json").exists() or (out / "processor_config.json").exists()


def test_vision_tower_is_opt_in(tokenizer):
    model, processor = _tiny_llava_with_processor(tokenizer)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    recipe = {
        "calibration": {"source": "skimage", "nsamples": 2, "seqlen": 16},
        "steps": [{"method": "wanda", "sparsity": 0.5, "component": "vision"}],
    }
    report = HFPruner(model, recipe=recipe, processor=processor).prune()
    assert all(m.name.startswith("model.vision_tower.encoder.layers.") for m in report.steps[0].modules)
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm_before.items())
    with pytest.raises(RecipeError, match="vision-language"):
        from .conftest import make_tiny_model

        HFPruner(
            make_tiny_model("llama"),
            tokenizer,
            {"steps": [{"method": "magnitude", "sparsity": 0.5, "component": "vision"}]},
        ).prune()


def test_visual_tokens_step_is_saved_and_restored_by_hf_prune(tmp_path, tokenizer):
    model, processor = _tiny_llava_with_processor(tokenizer)
    recipe = {
        "steps": [{"method": "depth", "blocks": [1]}, {"method": "visual_tokens", "strategy": "divprune", "keep": 0.5}]
    }
    pruner = HFPruner(model, recipe=recipe, processor=processor)
    pruner.prune()
    assert model.config.text_config.num_hidden_layers == 2
    out = pruner.save_pretrained(tmp_path / "vt")
    steps = json.loads((out / "config.json").read_text())["pruning_config"]["steps"]
    assert steps[1]["method"] == "visual_tokens" and steps[1]["strategy"] == "divprune"
    loaded, _, loaded_processor = load_pretrained(str(out))
    assert loaded_processor is not None
    restored = loaded._hf_prune_visual_tokens
    assert restored.settings.strategy == "divprune" and restored.settings.keep == 0.5
    plain = AutoModelForImageTextToText.from_pretrained(out)
    assert not hasattr(plain, "_hf_prune_visual_tokens")  # plain transformers: the weights only


def test_visual_tokens_step_needs_a_vlm(tokenizer):
    from hf_prune.errors import UnsupportedModelError

    from .conftest import make_tiny_model

    with pytest.raises(UnsupportedModelError, match="vision-language"):
        HFPruner(make_tiny_model("llama"), tokenizer, {"steps": [{"method": "visual_tokens"}]}).prune()
