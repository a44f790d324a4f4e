"""Depth pruning with and without least-squares compensation (one linear map per removed run, folded into the
down projection of the block before it), at several block counts, in the README's setting.

    python benchmarks/depth_compensation.py --blocks 4 6 8 10 12 --out benchmarks/results/depth_compensation.json

SmolLM2-135M (packaged), angular criterion, calibration 32 x 512 tokens of fortunes (seed 0), perplexity on the
first 32 Wikipedia windows of 512 tokens (README convention). A benchmark prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 6, 8, 10, 12])
    parser.add_argument("--criterion", default="angular")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    from hf_prune import HFPruner
    from hf_prune.errors import HFPruneError

    rows = []
    for n in args.blocks:
        for compensate in ("none", "least_squares"):
            recipe = {
                "calibration": {"source": "fortunes", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                "steps": [{"method": "depth", "criterion": args.criterion, "num_blocks": n, "compensate": compensate}],
            }
            pruner = HFPruner.from_pretrained(args.model, recipe=recipe)
            try:
                report = pruner.prune()
            except HFPruneError as exc:  # a family the map cannot be folded into (Gemma's sandwich norms)
                print(f"{n} blocks, {compensate}: refused: {exc}", flush=True)
                continue
            details = report.steps[0].details
            rows.append(
                {
                    "blocks": n,
                    "compensate": compensate,
                    "removed": details["removed_blocks"],
                    "fit": details.get("compensation"),
                    "params": report.params_after,
                    "ppl": pruner.perplexity("wikipedia", 512, args.eval_windows),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=2)
    print("\n| blocks removed | removed | ppl, removed | ppl, least squares | ratio | run error (removed -> fit) |")
    print("|---|---|---|---|---|---|")
    for n in args.blocks:
        plain = next(r for r in rows if r["blocks"] == n and r["compensate"] == "none")
        ls = next((r for r in rows if r["blocks"] == n and r["compensate"] == "least_squares"), None)
        if ls is None:
            print(f"| {n} | {plain['removed']} | {plain['ppl']:.2f} | refused | - | - |")
            continue
        fits = ", ".join(
            f"{f['error_removed']:.4f} -> {f.get('error_compensated', float('nan')):.4f}" for f in ls["fit"]
        )
        print(
            f"| {n} | {plain['removed']} | {plain['ppl']:.2f} | {ls['ppl']:.2f} | {ls['ppl'] / plain['ppl']:.2f} | "
            f"{fits} |"
        )


if __name__ == "__main__":
    main()
