"""Depth pruning: perplexity after removing 10/20/30% of the blocks with each criterion (scores computed once per
criterion on the dense model, then each ratio removes the lowest-scoring blocks), plus the random baseline.

Setting: calibration 32 x 512 tokens of fortunes (seed 0; ppl_delta scores on the first 8 windows); perplexity on the
first 32 windows of 512 tokens of the Wikipedia extracts.

    python benchmarks/depth_bench.py --model packaged:smollm2-135m

A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json

from hf_prune import HFPruner
from hf_prune.methods.depth.scores import allowed_blocks, lowest_scoring
from hf_prune.pruner import load_model_and_tokenizer

CALIB = {"source": "fortunes", "nsamples": 32, "seqlen": 512, "seed": 0}


def run_depth(model_id: str, step: dict, eval_windows: int) -> tuple[list[int], float, float]:
    """Prune with one depth step; return (blocks removed, perplexity, scoring + removal time)."""
    model, tokenizer = load_model_and_tokenizer(model_id)
    pruner = HFPruner(model, tokenizer, {"calibration": CALIB, "steps": [step]})
    report = pruner.prune()
    details = report.steps[0].details
    return details["removed_blocks"], pruner.perplexity("wikipedia", 512, eval_windows), report.steps[0].time_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    total = model.config.num_hidden_layers
    dense = HFPruner(model, tokenizer).perplexity("wikipedia", 512, args.eval_windows)
    rows = [("dense", 0.0, [], dense, 0.0)]
    # ppl_delta scores every block once (the costly part), then each ratio removes the lowest-scoring ones.
    model, tokenizer = load_model_and_tokenizer(args.model)
    report = HFPruner(
        model,
        tokenizer,
        {
            "calibration": CALIB,
            "steps": [{"method": "depth", "criterion": "ppl_delta", "num_blocks": 1, "ppl_nsamples": 8}],
        },
    ).prune()
    ppl_scores = {int(k): v for k, v in report.steps[0].details["scores"]["calibration_ppl_without_block"].items()}
    ppl_time = report.steps[0].time_s
    for ratio in args.ratios:
        n = max(1, round(ratio * total))
        for criterion in ("angular", "block_influence", "random"):
            blocks, ppl, t = run_depth(
                args.model, {"method": "depth", "criterion": criterion, "num_blocks": n}, args.eval_windows
            )
            rows.append((criterion, ratio, blocks, ppl, t))
            print(f"{criterion} {ratio}: {blocks} ppl {ppl:.2f}", flush=True)
        blocks = lowest_scoring(ppl_scores, n, allowed_blocks(total, 0, 0))
        _, ppl, _ = run_depth(args.model, {"method": "depth", "blocks": blocks}, args.eval_windows)
        rows.append(("ppl_delta", ratio, blocks, ppl, ppl_time))
        print(f"ppl_delta {ratio}: {blocks} ppl {ppl:.2f}", flush=True)

    print(
        f"\nModel {args.model} ({total} blocks); calibration 32 x 512 tokens of fortunes, seed 0 (ppl_delta on 8 "
        f"windows); perplexity: wikipedia, first {args.eval_windows} windows of 512 tokens."
    )
    print("\n| criterion | removed | blocks removed | perplexity | scoring time (s) |")
    print("|---|---|---|---|---|")
    for criterion, ratio, blocks, ppl, t in rows:
        print(f"| {criterion} | {ratio:.0%} ({len(blocks)}) | {blocks} | {ppl:.2f} | {t:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
