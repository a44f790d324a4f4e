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
    parser.add_argument("--compensations", nargs="+", default=["none", "least_squares"])
    parser.add_argument("--out")
    args = parser.parse_args()
    from hf_prune import HFPruner
    from hf_prune.errors import HFPruneError

    rows = []
    for n in args.blocks:
        for compensate in args.compensations:
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
    fitted = [c for c in args.compensations if c != "none"]
    print("\n| blocks removed | removed | " + " | ".join(f"ppl, {c}" for c in args.compensations) + " | run error |")
    print("|---|---|" + "---|" * len(args.compensations) + "---|")
    for n in args.blocks:
        by = {r["compensate"]: r for r in rows if r["blocks"] == n}
        ppl = " | ".join(f"{by[c]['ppl']:.2f}" if c in by else "refused" for c in args.compensations)
        fits = "; ".join(f"{c}: " + _fits(by[c]["fit"]) for c in fitted if c in by)
        removed = next(iter(by.values()))["removed"] if by else "-"
        print(f"| {n} | {removed} | {ppl} | {fits or '-'} |")


def _fits(entries: list[dict]) -> str:
    return ", ".join(f"{f['error_removed']:.4f} -> {f.get('error_compensated', float('nan')):.4f}" for f in entries)


if __name__ == "__main__":
    main()
