"""Tiny random vision-language models built from each family's real config classes, with matching inputs."""

import torch
import transformers as T

TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VLM_FAMILIES = ["llava", "qwen2_vl", "idefics3", "gemma3"]
SIGLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4
)
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
N_IMAGE = 16


def _spread(model):
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_vlm(family: str, seed: int = 0):
    """(model, input_ids, other inputs) for a prompt: 5 text tokens, one image of N_IMAGE tokens, 7 text tokens."""
    torch.manual_seed(seed)
    text = torch.randint(1, 900, (1, 12), generator=torch.Generator().manual_seed(seed))
    if family == "llava":
        config = T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**CLIP),
            text_config=T.LlamaConfig(**TEXT),
            image_token_id=999,
        )
        image_id, extra = 999, {"pixel_values": torch.randn(1, 3, 32, 32)}
    elif family == "qwen2_vl":
        config = T.Qwen2VLConfig(
            text_config=dict(
                model_type="qwen2_vl_text", **TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}
            ),
            vision_config=dict(
                depth=2,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                in_chans=3,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=998,
            video_token_id=997,
            vision_start_token_id=996,
        )
        image_id = 998
        extra = {"pixel_values": torch.randn(64, 1176), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    elif family in ("idefics3", "smolvlm"):  # SmolVLM: its own classes around Idefics3's connector
        config_class = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
        config = config_class(
            text_config=dict(model_type="llama", **TEXT),
            vision_config=SIGLIP,
            image_token_id=999,
            scale_factor=2,
        )
        image_id = 999
        extra = {
            "pixel_values": torch.randn(1, 1, 3, 32, 32),
            "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool),
        }
    elif family == "gemma3":
        config = T.Gemma3Config(
            text_config=dict(model_type="gemma3_text", **TEXT, head_dim=16, sliding_window=512),
            vision_config=SIGLIP,
            mm_tokens_per_image=N_IMAGE,
            image_token_index=999,
            boi_token_index=998,
            eoi_token_index=997,
        )
        image_id, extra = 999, {"pixel_values": torch.randn(1, 3, 32, 32)}
    else:
        raise ValueError(family)
    model = _spread(T.AutoModelForImageTextToText.from_config(config))
    ids = torch.cat([text[:, :5], torch.full((1, N_IMAGE), image_id), text[:, 5:]], dim=1)
    if family == "qwen2_vl":
        extra["mm_token_type_ids"] = (ids == image_id).long()
    if family == "gemma3":
        extra["token_type_ids"] = (ids == image_id).long()
    return model, ids, extra
