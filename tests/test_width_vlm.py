"""Width of a vision-language model's language model: MLP neurons and heads narrow in the nested text config, the
vision tower and projector stay as they were, and the saved folder reloads with its own class to identical logits
on image + text inputs; what its config cannot express is refused before any work."""

import pytest
import torch

from hf_prune import HFPruner
from hf_prune.errors import UnsupportedModelError

from .test_vlm import _saved_reloads_to_the_same_logits, _tiny_llava_with_processor
from .vlm_models import VLM_FAMILIES, tiny_vlm

HEADS_REFUSED = ("qwen2_vl",)  # its text attention derives head_dim from hidden_size


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_the_language_model_of_a_vlm_narrows_into_its_own_class(family, tokenizer, tiny_recipe, tmp_path):
    model, ids, extra = tiny_vlm(family)
    model.resize_token_embeddings(len(tokenizer))  # text calibration with the packaged tokenizer
    vision = {k: v.clone() for k, v in model.state_dict().items() if "vision" in k or "visual" in k}
    step = {"method": "width", "mlp": 0.25, **({} if family in HEADS_REFUSED else {"heads": 0.5})}
    pruner = HFPruner(model, tokenizer, tiny_recipe(step))
    pruner.prune()
    pruned = pruner.model
    text = pruned.config.get_text_config()
    assert type(pruned) is type(model) and text.intermediate_size == 96
    if "heads" in step:
        assert text.num_attention_heads == 2
    state = pruned.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in vision.items())  # the vision side is untouched
    out = pruner.save_pretrained(tmp_path / "out")
    reloaded = type(model).from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, **extra).logits, pruned(input_ids=ids, **extra).logits)


def test_qwen2_vl_heads_are_refused_before_any_work(tokenizer, tiny_recipe):
    model, _, _ = tiny_vlm("qwen2_vl")
    model.resize_token_embeddings(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="cannot describe"):
        HFPruner(model, tokenizer, tiny_recipe({"method": "width", "heads": 0.5})).prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_image_calibrated_width_on_llava_reloads_with_auto_class(tokenizer, tmp_path):
    model, processor = _tiny_llava_with_processor(tokenizer)
    recipe = {
        "calibration": {"source": "skimage", "nsamples": 2, "seqlen": 24},
        "steps": [{"method": "width", "mlp": 0.5}],
    }
    pruner = HFPruner(model, recipe=recipe, processor=processor)
    pruner.prune()
    _saved_reloads_to_the_same_logits(pruner, processor, tmp_path / "vlm")


def test_per_block_width_of_a_llava_is_refused_before_any_work(tokenizer):
    """Per-block widths have no VLM checkpoint yet."""
    model, processor = _tiny_llava_with_processor(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = {"method": "width", "mlp": 0.25, "per_block": True}
    recipe = {"calibration": {"source": "skimage", "nsamples": 2, "seqlen": 24}, "steps": [step]}
    with pytest.raises(UnsupportedModelError, match="vision-language"):
        HFPruner(model, recipe=recipe, processor=processor).prune()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _silence_stream_channels(model, dead: torch.Tensor, projector_out: tuple[str, int]) -> None:
    """Stream channels ``dead`` carry nothing: zero in the embeddings, in every block writer's rows and in what the
    projector writes; the language model's norms get spread weights and a tiny epsilon, so that removing the
    channels (and rescaling the norms) leaves the logits as they were."""
    from hf_prune.adapters import ModelAdapter

    key, dim = projector_out
    adapter = ModelAdapter(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dead] = 0
        model.get_parameter(key).index_fill_(dim, dead, 0.0)
        bias = key.rpartition(".")[0] + ".bias"
        if bias in dict(model.named_parameters()):
            model.get_parameter(bias)[dead] = 0
        for ref in adapter.all_linears():
            if ref.role in ("o", "down"):
                ref.module.weight[dead] = 0
        for name, module in model.named_modules():
            if name.startswith(adapter.vlm.language_model) and "norm" in name.rsplit(".", 1)[-1]:
                module.weight.uniform_(0.5, 1.5)
                for attr in ("eps", "variance_epsilon"):
                    if hasattr(module, attr):
                        setattr(module, attr, 1e-12)
    text = model.config.get_text_config()
    for key in ("rms_norm_eps", "layer_norm_eps"):  # the rebuilt model's norms take it from the config
        if hasattr(text, key):
            setattr(text, key, 1e-12)


def test_hidden_channels_of_llava_narrow_its_projector_neurons_scored_on_the_images(tokenizer, tmp_path):
    """LLaVA's projector (linear_1 -> GELU -> linear_2) is hidden_size wide inside: a narrower stream narrows its
    neurons too. With image calibration they are scored on the images: the 16 neurons that never fire (zero rows and
    bias in linear_1, but the largest columns in linear_2, which a weight-only score would keep) go, with the 16
    stream channels that carry nothing; the logits on image + text stay, and the saved folder reloads to them."""
    model, processor = _tiny_llava_with_processor(tokenizer)
    dead = torch.arange(0, 64, 4)
    silent = torch.arange(1, 64, 4)  # projector neurons
    _silence_stream_channels(model, dead, ("model.multi_modal_projector.linear_2.weight", 0))
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.linear_1.weight[silent] = 0
        projector.linear_1.bias[silent] = 0
        projector.linear_2.weight[:, silent] = 10 * projector.linear_2.weight.abs().max()
    inputs = processor(
        images=[torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()], text=["<image>\nHello"], return_tensors="pt"
    )
    with torch.no_grad():
        before = model(**inputs).logits
    step = {"method": "width", "hidden": 0.25, "criterion": "activation"}
    recipe = {"calibration": {"source": "skimage", "nsamples": 2, "seqlen": 24}, "steps": [step]}
    pruner = HFPruner(model, recipe=recipe, processor=processor)
    details = pruner.prune().steps[0].details
    pruned = pruner.model
    assert details["projector_neurons"]["after"] == 48 and "image tokens" in details["projector_neurons"]["scored_on"]
    assert pruned.model.multi_modal_projector.linear_1.weight.shape == (48, 32)
    assert pruned.model.multi_modal_projector.linear_2.weight.shape == (48, 48)
    with torch.no_grad():
        after = pruned(**inputs).logits
    assert torch.allclose(after, before, atol=1e-4 * before.abs().max().item(), rtol=0)
    _saved_reloads_to_the_same_logits(pruner, processor, tmp_path / "out")


PROJECTOR_OUT = {  # the projector tensor that writes image features into the stream, and its stream dimension
    "llava": ("model.multi_modal_projector.linear_2.weight", 0),
    "idefics3": ("model.connector.modality_projection.proj.weight", 0),
    "smolvlm": ("model.connector.modality_projection.proj.weight", 0),
    "gemma3": ("model.multi_modal_projector.mm_input_projection_weight", 1),
}


@pytest.mark.parametrize("family", list(PROJECTOR_OUT))
def test_hidden_channels_of_a_vlm_narrow_the_projector_with_the_stream(family, tokenizer, tiny_recipe, tmp_path):
    """Stream channels that carry nothing (zero in the embeddings, in every writer's rows and in the projector's
    output) are removed from the language model and the projector alike: the logits on image + text are unchanged
    (Gemma 3's stream rescaled by its embedding scale, image features included), and the saved folder reloads with
    its own class to the same logits. LLaVA's projector neurons, calibrated on text only, are scored by their
    weights: the 16 whose linear_2 columns are zero go."""
    model, ids, extra = tiny_vlm(family)
    model.resize_token_embeddings(len(tokenizer))
    dead = torch.arange(0, 64, 4)  # 16 of the 64 stream channels
    key, dim = PROJECTOR_OUT[family]
    _silence_stream_channels(model, dead, (key, dim))
    with torch.no_grad():
        if family == "llava":
            model.model.multi_modal_projector.linear_2.weight[:, torch.arange(2, 64, 4)] = 0
        before = model(input_ids=ids, **extra).logits
    pruner = HFPruner(model, tokenizer, tiny_recipe({"method": "width", "hidden": 0.25, "criterion": "activation"}))
    details = pruner.prune().steps[0].details
    pruned = pruner.model
    assert pruned.config.get_text_config().hidden_size == 48 and details["hidden_size"]["after"] == 48
    assert pruned.get_parameter(key).shape[dim] == 48
    if family == "llava":
        assert details["projector_neurons"]["scored_on"].startswith("weights")
        assert pruned.model.multi_modal_projector.linear_2.weight.shape == (48, 48)
    with torch.no_grad():
        after = pruned(input_ids=ids, **extra).logits
    assert torch.allclose(after, before, atol=1e-4 * before.abs().max().item(), rtol=0)
    reloaded = type(model).from_pretrained(pruner.save_pretrained(tmp_path / "out")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, **extra).logits, after)
