"""Healing: perplexity before and after a fixed LoRA budget on pruned SmolLM2-135M, with and without distillation,
masked LoRA vs SHiRA at equal trainable parameters; sparsity after merge; wall time.

Setting: pruning as in the core benchmark (calibration 32 x 512 tokens of fortunes, seed 0); healing on fortunes
(steps x 4 x 256 tokens, lr 2e-4, r 16); perplexity on the first 32 windows of 512 tokens of the Wikipedia extracts.

    python benchmarks/heal_bench.py --steps 50

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse

from hf_prune import HFPruner
from hf_prune.adapters import ModelAdapter, zero_fraction

CALIB = {"source": "fortunes", "nsamples": 32, "seqlen": 512, "seed": 0}
CASES = {
    "wanda-2of4 / masked LoRA": ([{"method": "wanda", "structure": "2:4"}], {"mask": "masked_lora"}),
    "wanda-2of4 / SHiRA": ([{"method": "wanda", "structure": "2:4"}], {"mask": "shira"}),
    "wanda-2of4 / masked LoRA + KD": (
        [{"method": "wanda", "structure": "2:4"}],
        {"mask": "masked_lora", "distill": True},
    ),
    "depth-20% / LoRA": ([{"method": "depth", "criterion": "angular", "ratio": 0.2}], {"mask": "none"}),
    "depth-20% / LoRA + KD": (
        [{"method": "depth", "criterion": "angular", "ratio": 0.2}],
        {"mask": "none", "distill": True},
    ),
    "slicegpt-25% shared / LoRA": ([{"method": "slicegpt", "slicing": 0.25, "rotation": "shared"}], {"mask": "none"}),
}


def linear_sparsity(model) -> float:
    return zero_fraction(ModelAdapter(model).all_linears())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--eval-windows", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        steps, heal = CASES[name]
        pruner = HFPruner.from_pretrained("packaged:smollm2-135m", recipe={"calibration": CALIB, "steps": steps})
        pruner.prune()
        before = pruner.perplexity("wikipedia", 512, args.eval_windows)
        sparsity_before = linear_sparsity(pruner.model)
        summary = pruner.heal(max_steps=args.steps, batch_size=4, seqlen=256, **heal)
        after = pruner.perplexity("wikipedia", 512, args.eval_windows)
        rows.append((name, before, after, sparsity_before, linear_sparsity(pruner.model), summary))
        print(f"{name}: {before:.2f} -> {after:.2f} ({summary['time_s']:.0f} s)", flush=True)
    print(
        f"\nSmolLM2-135M; healing {args.steps} steps x 4 x 256 tokens of fortunes (lr 2e-4, r 16, alpha 32; KD: "
        "alpha 0.5, T 2, dense teacher on the fly); perplexity: wikipedia, first 32 windows of 512 tokens."
    )
    print(
        "\n| pruned / healing | ppl before | ppl after | block-linear sparsity before -> after merge | "
        "trainable params | heal time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, before, after, s0, s1, summary in rows:
        print(
            f"| {name} | {before:.2f} | {after:.2f} | {s0:.4f} -> {s1:.4f} | {summary['trainable_params']:,} | "
            f"{summary['time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
