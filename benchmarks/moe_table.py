"""The mixture-of-experts table: pruning the MoE built from SmolLM2 against the same methods on dense SmolLM2.

Runs (or resumes) ``prune_bench.py`` on both models in the README's setting, then prints one table:

    python benchmarks/moe_table.py                  # runs what is missing, then prints
    python benchmarks/moe_table.py --print-only     # from benchmarks/results/*.json

MoE: ``packaged:smollm2-135m-moe`` (16 experts of 96 neurons, 12 per token, routers fitted on fortunes; see the
README). Weight pruning: each expert's matrices calibrated on its routed tokens (``routed``, default) or on every
token (``all``). Expert removal: a fraction of the 16 routed experts of every block, by criterion.
The prune-time columns come from ``--timing`` runs made one configuration at a time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MOE = "packaged:smollm2-135m-moe"
DENSE = "packaged:smollm2-135m"
WEIGHT = ["wanda-50", "wanda-2of4", "sparsegpt-50", "sparsegpt-2of4"]
# moe_calibration: all gives every expert a Hessian of every token: SparseGPT pays E times the Hessian work, so the
# all-token rows are measured for Wanda at 50% / 2:4 and SparseGPT at 50% only.
ALL_TOKENS = ["wanda-50", "wanda-2of4", "sparsegpt-50"]
EXPERTS = [f"experts-{c}-{p}" for p in (25, 50) for c in ("reap", "frequency", "random")]
TIMED = ["wanda-50", "sparsegpt-50"]


def bench(model: str, configs: list[str], out: str) -> None:
    cmd = [sys.executable, os.path.join(HERE, "prune_bench.py"), "--model", model, "--configs", *configs, "--out", out]
    subprocess.run(cmd, check=True)


def load(path: str) -> dict[str, dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["config"]: r for r in json.load(f)["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args()
    moe_path = os.path.join(RESULTS, "moe_smollm2.json")
    dense_path = os.path.join(RESULTS, "weight_smollm2.json")
    timing = {m: os.path.join(RESULTS, f"moe_timing_{n}.json") for m, n in ((MOE, "moe"), (DENSE, "dense"))}
    if not args.print_only:
        all_configs = [*WEIGHT, *(f"{w}-moe-all" for w in ALL_TOKENS)]
        bench(MOE, ["dense", *all_configs, *EXPERTS], moe_path)
        bench(DENSE, ["dense", *WEIGHT], dense_path)
        for model, path in timing.items():
            bench(model, ["dense", *TIMED], path)
    moe, dense = load(moe_path), load(dense_path)
    times = {m: load(p) for m, p in timing.items()}

    print(
        "Calibration 32 x 512 tokens of fortunes (seed 0); perplexity: Wikipedia, first 32 windows of 512 tokens "
        "(README convention); fp32, 2 CPU cores.\n"
    )
    print("| config | dense SmolLM2 | MoE, routed (default) | MoE, all tokens | MoE / dense |")
    print("|---|---|---|---|---|")
    d0, m0 = dense["dense"]["ppl"], moe["dense"]["ppl"]
    print(f"| unpruned | {d0:.2f} | {m0:.2f} | - | {m0 / d0:.2f}x |")
    for name in WEIGHT:
        d, r, a = dense.get(name), moe.get(name), moe.get(f"{name}-moe-all")
        if not (d and r):
            continue
        rel = (r["ppl"] / m0) / (d["ppl"] / d0)
        all_ppl = f"{a['ppl']:.2f}" if a else "-"
        print(f"| {name} | {d['ppl']:.2f} | {r['ppl']:.2f} | {all_ppl} | {rel:.2f}x (relative rise) |")
    print("\n| expert removal | experts left | parameters | perplexity |")
    print("|---|---|---|---|")
    before = next((r["params_before"] for r in moe.values() if "params_before" in r), None)
    print(f"| none | 16 | {f'{before:,}' if before else '-'} | {m0:.2f} |")
    for name in EXPERTS:
        r = moe.get(name)
        if r:
            left = r["details"][0]["experts_after"]
            print(f"| {name} | {left} | {r['params_after']:,} | {r['ppl']:.2f} |")
    if all(times.values()):
        print("\n| prune time (s), idle machine | dense SmolLM2 | MoE | MoE / dense |")
        print("|---|---|---|---|")
        for name in ["dense-forward", *TIMED]:
            key = "dense_forward_s" if name == "dense-forward" else "prune_s"
            src = "dense" if name == "dense-forward" else name
            d, m = times[DENSE][src][key], times[MOE][src][key]
            print(f"| {name} | {d:.1f} | {m:.1f} | {m / d:.2f}x |")


if __name__ == "__main__":
    main()
