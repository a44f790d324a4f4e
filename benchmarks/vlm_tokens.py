"""Visual-token pruning on the offline LLaVA-style harness: prefill time and FLOPs vs the fraction of image tokens
kept, decode speed, and how far the next-token distributions move from the unpruned model (KL), per method.

The harness is the real SmolLM2-135M language model with a small RANDOMLY initialised CLIP vision tower
(224 px, patch 14: 256 image tokens) and projector; the images are real (scikit-image photos). The visual features are
untrained, so the KL numbers measure how much each method perturbs the language model, not answer quality.

    python benchmarks/vlm_tokens.py --images 8 --runs 3

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def lm_flops(model, lengths: dict[int, int]) -> float:
    """Analytic prefill FLOPs of the language model: 2 x params x tokens per block, plus attention scores and values
    (4 x n^2 x heads x head_dim per block), plus the head on the last position."""
    from hf_prune.adapters import ModelAdapter

    adapter = ModelAdapter(model)
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total = 0.0
    for i, block in enumerate(adapter.blocks):
        n = lengths[i]
        params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
        total += 2 * params * n + 4 * n * n * cfg.num_attention_heads * head_dim
    return total + 2 * cfg.hidden_size * cfg.vocab_size


def block_lengths(model):
    from hf_prune.adapters import ModelAdapter

    seen, handles = {}, []

    def recorder(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).shape[1]

        return hook

    for i, block in enumerate(ModelAdapter(model).blocks):
        handles.append(block.register_forward_pre_hook(recorder(i), with_kwargs=True))
    return seen, handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--methods", nargs="+", default=["fastv", "divprune", "random", "uniform"])
    args = parser.parse_args()

    from hf_prune.vlm import enable_visual_token_pruning
    from hf_prune.vlm.data import skimage_pairs
    from hf_prune.vlm.harness import IMAGE_TOKEN, build_llava_smollm2

    model, processor = build_llava_smollm2()
    pairs = skimage_pairs()[: args.images]
    prompts = [
        processor(images=[img], text=[f"{IMAGE_TOKEN}\nDescribe the picture in detail."], return_tensors="pt")
        for img, _ in pairs
    ]
    n_image = int((prompts[0]["input_ids"] == model.config.image_token_id).sum())
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        dense = []
        for inputs in prompts:  # the unpruned reference: greedy continuation and its distributions
            out = model.generate(
                **inputs, max_new_tokens=args.kl_tokens, min_new_tokens=args.kl_tokens, do_sample=False, pad_token_id=0
            )
            full = {**inputs, "input_ids": out, "attention_mask": torch.ones_like(out)}
            logits = model(**full, use_cache=False).logits[:, -args.kl_tokens - 1 :]
            dense.append((full, F.log_softmax(logits.float(), -1)))

        rows = []
        for method in args.methods:
            for keep in args.keeps:
                pruner = enable_visual_token_pruning(model, method, keep=keep)
                prefill, decode, kls, flops = [], [], [], []
                for (full, ref), inputs in zip(dense, prompts):
                    seen, handles = block_lengths(model)
                    for r in range(args.runs):
                        start = time.perf_counter()
                        model(**inputs, use_cache=False)
                        prefill.append(time.perf_counter() - start)
                        if r == 0:
                            flops.append(lm_flops(model, dict(seen)))
                    for h in handles:
                        h.remove()
                    start = time.perf_counter()
                    model.generate(**inputs, use_cache=True, **gen)
                    decode.append(time.perf_counter() - start)
                    logits = model(**full, use_cache=False).logits[:, -args.kl_tokens - 1 :]
                    pruned = F.log_softmax(logits.float(), -1)
                    kls.append(float(F.kl_div(pruned, ref, log_target=True, reduction="none").sum(-1).mean()))
                rows.append(
                    (
                        method,
                        keep,
                        pruner.last_kept,
                        statistics.median(prefill),
                        statistics.mean(flops) / 1e9,
                        args.new_tokens / statistics.median(decode),
                        statistics.mean(kls),
                    )
                )
                pruner.disable()

    print(
        f"\nLLaVA-style harness: SmolLM2-135M language model (real weights) + random CLIP vision tower "
        f"(untrained visual features), {n_image} image tokens per image, {len(prompts)} scikit-image photos; "
        f"fp32, {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}. "
        f"KL(unpruned || pruned) of next-token distributions at the last prompt token and {args.kl_tokens} "
        "greedy tokens of the unpruned model, mean over positions and images."
    )
    print("\n| method | keep | image tokens kept | prefill (s, median) | LM prefill GFLOPs | decode tok/s | KL |")
    print("|---|---|---|---|---|---|---|")
    for method, keep, kept, p, g, tps, kl in rows:
        print(f"| {method} | {keep:.0%} | {kept} | {p:.3f} | {g:.1f} | {tps:.1f} | {kl:.4f} |")


if __name__ == "__main__":
    main()
