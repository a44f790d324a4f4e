"""Shared fixtures: tiny random models built from each family's real config class, and a real tokenizer.

The tokenizer is SmolLM2's (from the packaged GGUF, converted once and cached), so calibration and evaluation
text goes through a real BPE; tiny models use its vocabulary size.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from hf_prune.assets import resolve_packaged_model

VOCAB = 49152
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "opt", "gpt2"]
MOE_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "olmoe", "qwen2_moe", "deepseek_v3", "llama4_text"]


# A 3-block tiny Llama dispatched over CPU and disk (accelerate offload): blocks 1 and 2 live in the offload folder.
DISK_OFFLOAD_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


TINY_WIDTHS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def tiny_config(family: str, layers: int = 3):
    common = dict(vocab_size=VOCAB, max_position_embeddings=1024)
    attn = {**TINY_WIDTHS, "num_hidden_layers": layers}
    if family == "llama":
        return transformers.LlamaConfig(**common, **attn, num_key_value_heads=2)
    if family == "mistral":
        return transformers.MistralConfig(**common, **attn, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, **attn, num_key_value_heads=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, **attn, num_key_value_heads=2, head_dim=16)
    if family == "gemma3_text":
        types = ["sliding_attention", "full_attention"] * ((layers + 1) // 2)
        return transformers.Gemma3TextConfig(
            **common, **attn, num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=types[:layers]
        )
    if family == "phi3":
        return transformers.Phi3Config(**common, **attn, num_key_value_heads=2, pad_token_id=0)
    if family == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB,
            max_position_embeddings=1024,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        )
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=64, n_layer=layers, n_head=4)
    return tiny_moe_config(family, layers, common, attn)


def tiny_moe_config(family: str, layers: int, common: dict, attn: dict):
    """Mixture-of-experts families: 8 routed experts (4 for Mixtral / gpt-oss / Llama 4) of width 32, top-2."""
    moe = dict(num_experts_per_tok=2, num_key_value_heads=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, **attn, **moe, moe_intermediate_size=32, num_experts=8, head_dim=16, norm_topk_prob=True
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**common, **{**attn, "intermediate_size": 32}, **moe, num_local_experts=4)
    if family == "gpt_oss":
        types = ["sliding_attention", "full_attention"] * ((layers + 1) // 2)
        return transformers.GptOssConfig(
            **common,
            **{**attn, "intermediate_size": 32},
            **moe,
            num_local_experts=4,
            head_dim=16,
            layer_types=types[:layers],
            sliding_window=16,
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, **{**attn, "intermediate_size": 32}, **moe, num_experts=8)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **attn, **moe, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8
        )
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common,
            **attn,
            **moe,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            rope_scaling=None,
        )
    if family == "llama4_text":
        return transformers.Llama4TextConfig(
            **common,
            **{**attn, "intermediate_size": 32},
            intermediate_size_mlp=128,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            head_dim=16,
        )
    raise ValueError(family)


def make_tiny_model(family: str, layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers))
    # Default init is tiny (std 0.02); spread the weights so activations and scores vary like a trained model's.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return resolve_packaged_model("packaged:smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def calib_texts() -> list[str]:
    """Real text for tiny-model calibration: Wikipedia extracts from the back half (the evaluation never reads it)."""
    from hf_prune.calibration.builtin_texts import wikipedia_tail_documents

    return wikipedia_tail_documents()[:400]


@pytest.fixture
def tiny_recipe(calib_texts):
    def build(step: dict, nsamples: int = 4, seqlen: int = 64, **extra) -> dict:
        recipe = {
            "calibration": {"source": calib_texts, "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
            "steps": [step],
        }
        recipe.update(extra)
        return recipe

    return build


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HF_PRUNE_SKIP_REAL"):
        skip = pytest.mark.skip(reason="HF_PRUNE_SKIP_REAL is set")
        for item in items:
            if "real_model" in item.keywords:
                item.add_marker(skip)
