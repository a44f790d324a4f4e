"""A LLaVA-style model assembled from parts available offline: the real SmolLM2-135M language model, a small
RANDOMLY initialised CLIP vision tower and projector, and a real processor. Every number measured with it says
that the visual features are untrained."""

from __future__ import annotations

import torch

from ..assets import resolve_packaged_model

IMAGE_TOKEN = "<image>"


def build_llava_smollm2(
    vision_layers: int = 4, vision_hidden: int = 256, image_size: int = 224, patch_size: int = 14, seed: int = 0
):
    """(model, processor): LlavaForConditionalGeneration with SmolLM2-135M's weights as its language model."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    lm_path = resolve_packaged_model("packaged:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text_config = AutoConfig.from_pretrained(lm_path)
    text_config.vocab_size = len(tokenizer)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.tie_word_embeddings = text_config.tie_word_embeddings
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    lm = AutoModelForCausalLM.from_pretrained(lm_path)
    with torch.no_grad():
        state = {k: v for k, v in lm.model.state_dict().items() if not k.startswith("embed_tokens")}
        model.model.language_model.load_state_dict(state, strict=False)
        emb = model.model.language_model.embed_tokens.weight
        old = lm.model.embed_tokens.weight
        emb[: old.shape[0]] = old
        emb[old.shape[0] :] = old.mean(dim=0)
        if model.lm_head.weight.data_ptr() != emb.data_ptr():
            model.lm_head.weight[: old.shape[0]] = lm.lm_head.weight
            model.lm_head.weight[old.shape[0] :] = lm.lm_head.weight.mean(dim=0)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model.eval(), processor
