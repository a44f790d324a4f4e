"""Block reconstruction: perplexity and pruning time of each weight-pruning setting without and with
``reconstruct: true``, paired, from a prune_bench.py results file.

    python benchmarks/prune_bench.py --model packaged:smollm2-135m --out benchmarks/results/reconstruct_smollm2.json \\
        --configs dense wanda-2of4 wanda-2of4-rec sparsegpt-2of4 sparsegpt-2of4-rec ...
    python benchmarks/reconstruct_table.py benchmarks/results/reconstruct_smollm2.json

Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    args = parser.parse_args()
    with open(args.results) as f:
        saved = json.load(f)
    rows = {r["config"]: r for r in saved["results"]}
    dense = rows.get("dense", {}).get("ppl")
    print(f"Model {saved['args']['model']}; dense perplexity {dense:.2f}" if dense else saved["args"]["model"])
    print("\n| setting | ppl | ppl with reconstruct | ratio | prune time (s) | with reconstruct (s) | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, plain in rows.items():
        rec = rows.get(f"{name}-rec")
        if rec is None:
            continue
        print(
            f"| {name} | {plain['ppl']:.2f} | {rec['ppl']:.2f} | {rec['ppl'] / plain['ppl']:.2f}x | "
            f"{plain['prune_s']:.1f} | {rec['prune_s']:.1f} | {rec['prune_s'] / plain['prune_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
