"""Where things live in each architecture, as data.

One row per ``model_type``. A new family whose modules follow an existing layout is one line in ``FAMILIES``;
a new layout is one ``ArchSpec``. Paths are dotted attribute paths: ``blocks`` from the model root, everything in
``linears`` / ``norms`` from the root of one decoder block.

Linear roles: q, k, v, o (attention), qkv (fused q/k/v), gate, up, down (MLP), gate_up (fused gate/up).
Mixture-of-experts roles: expert_gate, expert_up, expert_down (one routed expert's matrices, whether stored as fused
3-D parameters or as per-expert linears), shared_gate, shared_up, shared_down (the always-on shared expert), router
(never a default target: it decides which expert runs).
Norm roles: attn_in (before attention), attn_out (after attention, "sandwich" norms), mlp_in, mlp_out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")
SHARED_EXPERT_ROLES = ("shared_gate", "shared_up", "shared_down")
ROUTER_ROLE = "router"
LINEAR_ROLES = (
    ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down") + EXPERT_ROLES + SHARED_EXPERT_ROLES + (ROUTER_ROLE,)
)
# Where transformers configs and MoE modules keep the routed-expert count.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
DEFAULT_EXCLUDED_ROLES = (ROUTER_ROLE,)  # pruned only when a step's ``targets`` names them
NORM_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class ExpertLayout:
    """How the routed experts of one MoE block are stored and called.

    Fused layout (transformers 5): ``gate_up`` and ``down`` name 3-D parameters of the experts module, one matrix per
    expert along dim 0, each (out, in) or, with ``transposed``, (in, out); gate and up rows are concatenated
    ([gate; up]) or ``interleaved`` (gate0, up0, gate1, ...). ``gate_up`` None: no gate, ``up`` names the first matrix.
    Per-expert layout (remote code, older checkpoints): the experts module is a ModuleList of MLPs whose linears are
    found under the names of ``expert_linears`` (first match per role); detected from the module, not declared.

    ``call``: how the block calls the experts module. ``routed``: (hidden (T, H), top_k_index (T, k),
    top_k_weights (T, k)), each expert's output scaled by its weight; ``scaled_rows`` (Llama 4): one (E * T, H)
    tensor, expert e's rows being the hidden states times its router score (0 where not routed).
    """

    gate_up: str | None = "gate_up_proj"
    up: str | None = None
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    call: str = "routed"
    expert_linears: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "expert_gate": ("gate_proj", "w1"),
            "expert_up": ("up_proj", "w3"),
            "expert_down": ("down_proj", "w2"),
        }
    )


@dataclass(frozen=True)
class MoESpec:
    """Where one MoE block's parts are (paths from the decoder block) and how many experts the config declares.

    A block without the ``experts`` module (DeepSeek's first dense blocks, Llama 4's interleaved dense blocks) is a
    dense block; its MLP linears come from the family's ``linears``.
    """

    experts: str
    router: str
    layout: ExpertLayout
    num_experts_key: str  # the config attribute holding the routed-expert count
    top_k_key: str = "num_experts_per_tok"
    shared: dict[str, str] = field(default_factory=dict)  # shared-expert roles -> paths
    other_routers: tuple[str, ...] = ()  # more gates that are never default targets (Qwen2-MoE's shared_expert_gate)
    expert_groups_key: str | None = None  # DeepSeek's n_group: experts are routed in equal contiguous groups


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
    other_mixers: tuple[str, ...] = ()  # what mixes tokens in blocks without ``attention`` (LFM2: "conv")
    notes: tuple[str, ...] = field(default_factory=tuple)
    moe: MoESpec | None = None


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


# Falcon: fused q/k/v (multi-query: [q heads; k; v], or grouped with new_decoder_architecture). Norm roles are those of
# Falcon-7B (one LayerNorm feeding attention and MLP side by side); Falcon-40B/180B's ln_attn / ln_mlp and
# Falcon-RW's post_attention_layernorm are not listed (no method that reads norm roles accepts Falcon: SliceGPT
# refuses it, width.hidden refuses it since head_dim derives from hidden_size).
FALCON = ArchSpec(
    blocks="transformer.h",
    linears={
        "qkv": "self_attention.query_key_value",
        "o": "self_attention.dense",
        "up": "mlp.dense_h_to_4h",
        "down": "mlp.dense_4h_to_h",
    },
    norms={"attn_in": "input_layernorm"},
    embeddings=("transformer.word_embeddings",),
    final_norm="transformer.ln_f",
    attention="self_attention",
)

# LFM2: blocks are either attention or a gated short convolution (conv.in_proj / conv.conv / conv.out_proj, same
# norms); every block has the SwiGLU feed-forward. A conv block's linears keep their own names as roles.
LFM2 = ArchSpec(
    blocks="model.layers",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "gate": "feed_forward.w1",
        "up": "feed_forward.w3",
        "down": "feed_forward.w2",
    },
    norms={"attn_in": "operator_norm", "mlp_in": "ffn_norm"},
    embeddings=("model.embed_tokens",),
    final_norm="model.embedding_norm",
    mlp="feed_forward",
    other_mixers=("conv",),
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
        moe=spec.moe,
    )


# Mixture-of-experts families of transformers 5: routed experts as fused 3-D parameters.
_FUSED = ExpertLayout()
_SHARED_EXPERT = {
    "shared_gate": "mlp.shared_expert.gate_proj",
    "shared_up": "mlp.shared_expert.up_proj",
    "shared_down": "mlp.shared_expert.down_proj",
}


def _moe(base: ArchSpec, moe: MoESpec, linears: dict[str, str] | None = None) -> ArchSpec:
    return ArchSpec(
        blocks=base.blocks,
        linears={**(linears or base.linears), **moe.shared, ROUTER_ROLE: moe.router},
        norms=base.norms,
        embeddings=base.embeddings,
        final_norm=base.final_norm,
        lm_head=base.lm_head,
        attention=base.attention,
        mlp=base.mlp,
        notes=base.notes,
        moe=moe,
    )


QWEN_MOE = _moe(LLAMA, MoESpec("mlp.experts", "mlp.gate", _FUSED, "num_experts"))
MIXTRAL = _moe(LLAMA, MoESpec("mlp.experts", "mlp.gate", _FUSED, "num_local_experts"))
QWEN2_MOE = _moe(
    LLAMA,
    MoESpec(
        "mlp.experts",
        "mlp.gate",
        _FUSED,
        "num_experts",
        shared=_SHARED_EXPERT,
        other_routers=("mlp.shared_expert_gate",),
    ),
)
GPT_OSS = _moe(
    LLAMA,
    MoESpec(
        "mlp.experts",
        "mlp.router",
        ExpertLayout(transposed=True, interleaved=True, gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias"),
        "num_local_experts",
    ),
)
DEEPSEEK_V3 = _moe(
    LLAMA,
    MoESpec(
        "mlp.experts",
        "mlp.gate",
        _FUSED,
        "n_routed_experts",
        shared={
            "shared_gate": "mlp.shared_experts.gate_proj",
            "shared_up": "mlp.shared_experts.up_proj",
            "shared_down": "mlp.shared_experts.down_proj",
        },
        expert_groups_key="n_group",
    ),
    # multi-head latent attention: its low-rank projections are found by name (roles q_a_proj, kv_b_proj, ...)
    linears={"o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
)
LLAMA4_TEXT = _moe(
    LLAMA,
    MoESpec(
        "feed_forward.experts",
        "feed_forward.router",
        ExpertLayout(transposed=True, call="scaled_rows"),
        "num_local_experts",
        shared={
            "shared_gate": "feed_forward.shared_expert.gate_proj",
            "shared_up": "feed_forward.shared_expert.up_proj",
            "shared_down": "feed_forward.shared_expert.down_proj",
        },
    ),
    linears={
        **{k: v for k, v in _LLAMA_LINEARS.items() if k in ("q", "k", "v", "o")},
        "gate": "feed_forward.gate_proj",
        "up": "feed_forward.up_proj",
        "down": "feed_forward.down_proj",
    },
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
    "falcon": FALCON,
    "lfm2": LFM2,
    "qwen3_moe": QWEN_MOE,
    "olmoe": QWEN_MOE,
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN2_MOE,
    "gpt_oss": GPT_OSS,
    "deepseek_v3": DEEPSEEK_V3,
    "llama4_text": LLAMA4_TEXT,
}

# Layouts an unlisted family is checked against: every MLP layout with every placement of the block's norms (module
# paths of the linears and of the block's own norms, exactly). A family with the same modules gets the layout's roles,
# so every method that needs roles (width, depth compensation, targets) works; the norm roles say where each norm
# sits (depth compensation refuses a normalized MLP output, SliceGPT needs the pre-norms).
_ATTENTION_LINEARS = {k: v for k, v in _LLAMA_LINEARS.items() if k in ("q", "k", "v", "o")}
MLP_LAYOUTS: dict[str, dict[str, str]] = {
    "gated": _LLAMA_LINEARS,  # Llama, Granite, Helium, OLMo 2, Cohere, EXAONE 4 ...
    "gateless": {**_ATTENTION_LINEARS, "up": "mlp.up_proj", "down": "mlp.down_proj"},  # Nemotron, Arcee, Apertus
    "fc": {**_ATTENTION_LINEARS, "up": "mlp.c_fc", "down": "mlp.c_proj"},  # Starcoder2
    "fused-gate-up": {**_ATTENTION_LINEARS, "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},  # GLM, GLM-4
}
NORM_LAYOUTS: dict[str, dict[str, str]] = {
    "pre-norm": LLAMA.norms,
    "sandwich": GEMMA_SANDWICH.norms,
    "post-norm": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},  # OLMo 2, EXAONE 4
    "parallel": {"attn_in": "input_layernorm"},  # Cohere: one norm feeds attention and MLP side by side
    "named-pre-norm": {"attn_in": "attention_layernorm", "mlp_in": "feedforward_layernorm"},  # Apertus
    "glm4-sandwich": {
        "attn_in": "input_layernorm",
        "attn_out": "post_self_attn_layernorm",
        "mlp_in": "post_attention_layernorm",
        "mlp_out": "post_mlp_layernorm",
    },
}
LAYOUT_TEMPLATES: dict[str, ArchSpec] = {
    f"{mlp}/{norms}": ArchSpec(
        blocks="model.layers",
        linears=linears,
        norms=placement,
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
    )
    for mlp, linears in MLP_LAYOUTS.items()
    for norms, placement in NORM_LAYOUTS.items()
}


# Structured width pruning (MLP neurons, attention heads): where each family's config records its widths, and which
# config flag gives the consuming projection (down / o) a bias for compensation. Families absent here are refused.
@dataclass(frozen=True)
class WidthSpec:
    """mlp_key: config key of the MLP intermediate width. heads: attention reads head_dim and the head counts from
    the config (not from hidden_size), so heads can be removed in a plain checkpoint. mlp_bias_key /
    attention_bias_key: the config flag that gives down / o a bias (None: the module has one already, or cannot).
    mlp_fixed: config values written with a new MLP width so the model takes it as written (LFM2 otherwise derives
    its width from intermediate_size)."""

    mlp_key: str = "intermediate_size"
    heads: bool = True
    mlp_bias_key: str | None = None
    attention_bias_key: str | None = None
    mlp_fixed: tuple[tuple[str, object], ...] = ()


_GEMMA_WIDTH = WidthSpec(attention_bias_key="attention_bias")
WIDTH_FAMILIES: dict[str, WidthSpec] = {
    "llama": WidthSpec(mlp_bias_key="mlp_bias", attention_bias_key="attention_bias"),
    "mistral": WidthSpec(),
    "qwen2": WidthSpec(),
    "qwen3": WidthSpec(attention_bias_key="attention_bias"),
    "gemma": _GEMMA_WIDTH,
    "gemma2": _GEMMA_WIDTH,
    "gemma3_text": _GEMMA_WIDTH,
    "opt": WidthSpec(mlp_key="ffn_dim", heads=False),  # attention derives head_dim from hidden_size
    "gpt2": WidthSpec(mlp_key="n_inner", heads=False),  # the same; and c_attn fuses q/k/v
    "phi3": WidthSpec(),  # fused qkv_proj / gate_up_proj: each part's rows cut alike
    "falcon": WidthSpec(mlp_key="ffn_hidden_size", heads=False),  # head_dim = hidden_size / num_attention_heads
    "lfm2": WidthSpec(mlp_fixed=(("block_auto_adjust_ff_dim", False),)),  # 2/3 and multiple_of rounding otherwise
}
