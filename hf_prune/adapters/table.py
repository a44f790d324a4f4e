"""Where things live in each architecture, as data.

One row per ``model_type``. A new family whose modules follow an existing layout is one line in ``FAMILIES``;
a new layout is one ``ArchSpec``. Paths are dotted attribute paths: ``blocks`` from the model root, everything in
``linears`` / ``norms`` from the root of one decoder block.

Linear roles: q, k, v, o (attention), qkv (fused q/k/v), gate, up, down (MLP), gate_up (fused gate/up).
Norm roles: attn_in (before attention), attn_out (after attention, "sandwich" norms), mlp_in, mlp_out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LINEAR_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
NORM_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    linears: dict[str, str]
    norms: dict[str, str]
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    notes: tuple[str, ...] = field(default_factory=tuple)


_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

LLAMA = ArchSpec(
    blocks="model.layers",
    linears=_LLAMA_LINEARS,
    norms={"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
)

# Gemma 2/3: "sandwich" norms around attention and MLP (post_attention_layernorm normalizes the attention OUTPUT).
GEMMA_SANDWICH = ArchSpec(
    blocks="model.layers",
    linears=_LLAMA_LINEARS,
    norms={
        "attn_in": "input_layernorm",
        "attn_out": "post_attention_layernorm",
        "mlp_in": "pre_feedforward_layernorm",
        "mlp_out": "post_feedforward_layernorm",
    },
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    notes=("embeddings are scaled by sqrt(hidden_size) inside the model", "per-layer sliding/full attention"),
)

PHI3 = ArchSpec(
    blocks="model.layers",
    linears={
        "qkv": "self_attn.qkv_proj",
        "o": "self_attn.o_proj",
        "gate_up": "mlp.gate_up_proj",
        "down": "mlp.down_proj",
    },
    norms={"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
)

OPT = ArchSpec(
    blocks="model.decoder.layers",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
    norms={"attn_in": "self_attn_layer_norm", "mlp_in": "final_layer_norm"},
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    mlp="",
)

# GPT-2 stores its projections as transformers' Conv1D, whose weight is (in_features, out_features).
GPT2 = ArchSpec(
    blocks="transformer.h",
    linears={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    norms={"attn_in": "ln_1", "mlp_in": "ln_2"},
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    attention="attn",
)


# Vision-language models: where the language model, the vision tower's blocks and the projector live. The language
# model's own layout comes from the text family's row above (text_config.model_type), with paths prefixed.
@dataclass(frozen=True)
class VLMSpec:
    language_model: str  # the decoder stack (holds .layers, .embed_tokens, .norm)
    vision_blocks: str
    projector: str
    image_prompt: str  # what a prompt holds for one image, before the processor expands it


_QWEN_VL = VLMSpec(
    "model.language_model", "model.visual.blocks", "model.visual.merger", "<|vision_start|><|image_pad|><|vision_end|>"
)
_IDEFICS3 = VLMSpec("model.text_model", "model.vision_model.encoder.layers", "model.connector", "<image>")
VLM_FAMILIES: dict[str, VLMSpec] = {
    "llava": VLMSpec(
        "model.language_model", "model.vision_tower.encoder.layers", "model.multi_modal_projector", "<image>\n"
    ),
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "gemma3": VLMSpec(
        "model.language_model", "model.vision_tower.encoder.layers", "model.multi_modal_projector", "<start_of_image>"
    ),
}
# Text decoders of VLMs whose layout is a row of FAMILIES under another name.
TEXT_ALIASES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2"}


def prefixed(spec: ArchSpec, prefix: str) -> ArchSpec:
    """A text family's spec moved under ``prefix`` (the language model inside a VLM); block-relative paths stay."""
    return ArchSpec(
        blocks=f"{prefix}.layers",
        linears=spec.linears,
        norms=spec.norms,
        embeddings=(f"{prefix}.embed_tokens",),
        final_norm=f"{prefix}.norm",
        lm_head=spec.lm_head,
        attention=spec.attention,
        mlp=spec.mlp,
        notes=spec.notes,
    )


FAMILIES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": GEMMA_SANDWICH,
    "gemma3_text": GEMMA_SANDWICH,
    "phi3": PHI3,
    "opt": OPT,
    "gpt2": GPT2,
}
