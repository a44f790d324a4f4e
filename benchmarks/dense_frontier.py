"""The dense structured frontier of SmolLM2-135M: perplexity against the fraction of parameters removed, for depth at
every block count (with and without least-squares compensation) and width on a fine grid (MLP neurons; hidden
channels + MLP), from the result files the benchmarks wrote (no pruning here):

    python benchmarks/depth_compensation.py --blocks 1 2 3 5 7 9 11 12 \\
        --out benchmarks/results/depth_every_count_smollm2.json
    python benchmarks/width_frontier.py --out benchmarks/results/structured_frontier_smollm2.json \\
        --criterion fluctuation --runs 0 --heal-levels --no-grid --levels 0.15 0.2 0.25 0.3 0.35 \\
        --kinds BEST/hidden+mlp BEST/mlp
    python benchmarks/dense_frontier.py --plot benchmarks/results/dense_frontier_smollm2.png

Every file is in the README's setting (calibration 32 x 512 tokens of fortunes, seed 0; perplexity on the first 32
Wikipedia windows of 512 tokens; fp32; no healing). Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _depth_rows() -> list[dict]:
    rows = []
    for name in ("depth_compensation.json", "depth_every_count_smollm2.json"):
        path = os.path.join(RESULTS, name)
        if os.path.exists(path):
            with open(path) as f:
                rows += json.load(f)
    seen, out = set(), []
    for r in rows:
        key = (r["blocks"], r["compensate"])
        if key not in seen:
            seen.add(key)
            line = "depth" if r["compensate"] == "none" else "depth + least squares"
            out.append(
                {"line": line, "config": f"{line}, {r['blocks']} blocks", "params": r["params"], "ppl": r["ppl"]}
            )
    return out


def _dense() -> dict:
    with open(os.path.join(RESULTS, "width_frontier_smollm2.json")) as f:
        return json.load(f)["results"]["dense"]


def _width_rows() -> list[dict]:
    out = []
    for name in ("width_frontier_smollm2.json", "structured_frontier_smollm2.json"):
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            results = json.load(f)["results"]
        for config, r in results.items():
            if not config.startswith("width") or "/heads" in config:
                continue
            method = config.rsplit(" ", 1)[0]
            if method not in (
                "width activation/least_squares/mlp",
                "width fluctuation/least_squares/mlp",
                "width fluctuation/least_squares/hidden+mlp",
            ):
                continue
            out.append({"line": method, "config": config, "params": r["params"], "ppl": r["ppl"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot")
    args = parser.parse_args()
    rows = sorted(_depth_rows() + _width_rows(), key=lambda r: -r["params"])
    dense = _dense()["params"]
    print("| config | params | removed | ppl |")
    print("|---|---|---|---|")
    for r in rows:
        removed = 1 - r["params"] / dense
        print(f"| {r['config']} | {r['params'] / 1e6:.1f} M | {removed:.1%} | {r['ppl']:.2f} |")
    if args.plot:  # the frontier's plot, by parameters: one line per method (named "line level")
        sys.path.insert(0, os.path.dirname(__file__))
        from width_frontier import plot

        results = {"dense": _dense()}
        results.update({f"{r['line']} {i}": r for i, r in enumerate(rows)})
        title = "SmolLM2-135M: depth at every block count vs width (no healing)"
        plot(results, args.plot, title, by_params=True)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
