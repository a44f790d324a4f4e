"""The dense structured frontier of SmolLM2-135M and Gemma-3-270m: perplexity against the fraction of parameters
removed, for depth at every block count (with and without least-squares compensation) and width on a fine grid (MLP
neurons; hidden channels + MLP), from the result files the benchmarks wrote (no pruning here):

    python benchmarks/depth_compensation.py --blocks 1 2 3 5 7 9 11 12 \\
        --out benchmarks/results/depth_every_count_smollm2.json
    python benchmarks/width_frontier.py --out benchmarks/results/structured_frontier_smollm2.json \\
        --criterion fluctuation --runs 0 --heal-levels --no-grid --levels 0.15 0.2 0.25 0.3 0.35 \\
        --kinds BEST/hidden+mlp BEST/mlp
    python benchmarks/dense_frontier.py --plot benchmarks/results/dense_frontier_smollm2.png

    python benchmarks/width_frontier.py --model packaged:gemma3-270m \\
        --out benchmarks/results/structured_frontier_gemma3.json --criterion fluctuation --runs 0 \\
        --heal-levels --no-grid --levels 0.05 0.1 0.15 0.2 0.25 0.3 --kinds BEST/mlp BEST/hidden+mlp
    python benchmarks/depth_compensation.py --model packaged:gemma3-270m --blocks 2 4 6 8 \\
        --out benchmarks/results/depth_every_count_gemma3.json
    python benchmarks/width_frontier.py --model packaged:gemma3-270m \
        --out benchmarks/results/frontier_healed_gemma3.json --criterion fluctuation --runs 0 --no-grid \
        --levels 0.2 --heal-levels 0.2 --kinds depth BEST/mlp BEST/hidden+mlp
    python benchmarks/dense_frontier.py --model gemma3 --plot benchmarks/results/dense_frontier_gemma3.png

Every file is in the README's setting (calibration 32 x 512 tokens of fortunes, seed 0; perplexity on the first 32
Wikipedia windows of 512 tokens; fp32; healing, where a file has it, as width_frontier.py's). Prints a markdown
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# model tag -> (title, depth result files, width result files; the first width file holds the dense row)
MODELS = {
    "smollm2": (
        "SmolLM2-135M",
        ("depth_compensation.json", "depth_every_count_smollm2.json"),
        (
            "width_frontier_smollm2.json",
            "structured_frontier_smollm2.json",
            "healed_15_smollm2.json",
            "hidden_healed_smollm2.json",
            "frontier_healed_smollm2.json",
        ),
    ),
    "gemma3": (
        "Gemma-3-270m",
        ("depth_every_count_gemma3.json",),
        ("structured_frontier_gemma3.json", "frontier_healed_gemma3.json"),
    ),
}
WIDTH_LINES = (
    "width activation/least_squares/mlp",
    "width fluctuation/least_squares/mlp",
    "width fluctuation/least_squares/hidden+mlp",
    "width fluctuation/least_squares/hidden+heads+mlp",
    "slicegpt",
)
DEPTH_KINDS = {"depth": "depth", "depth+ls": "depth + least squares"}  # frontier names -> depth lines


def _load(name: str):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _depth_rows(files) -> list[dict]:
    rows = [r for name in files for r in (_load(name) or [])]
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


def _dense(files) -> dict:
    return _load(files[0])["results"]["dense"]


def _width_rows(files) -> list[dict]:
    """Width and SliceGPT rows of the frontier files; their depth rows too (with healing where it was run), unless
    the depth files have that block count already."""
    out = []
    for name in files:
        results = (_load(name) or {}).get("results", {})
        for config, r in results.items():
            method = config.rsplit(" ", 1)[0]
            row = {"line": method, "config": config, "params": r["params"], "ppl": r["ppl"]}
            if r.get("ppl_healed"):
                row["ppl_healed"] = r["ppl_healed"]
            if method in DEPTH_KINDS:
                blocks = r["steps"][0]["num_blocks"]
                row.update(line=DEPTH_KINDS[method], config=f"{DEPTH_KINDS[method]}, {blocks} blocks", blocks=blocks)
                out.append(row)
            elif method in WIDTH_LINES:
                out.append(row)
    return out


def _merged(depth: list[dict], width: list[dict]) -> list[dict]:
    """One row per configuration: a frontier row replaces the depth file's row of the same block count when it has
    a healed perplexity (the unhealed ones are the same prune, measured twice)."""
    rows = {r["config"]: r for r in depth}
    for r in width:
        if r["config"] not in rows or "ppl_healed" in r:
            rows[r["config"]] = r
    return sorted(rows.values(), key=lambda r: -r["params"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--plot")
    args = parser.parse_args()
    title, depth_files, width_files = MODELS[args.model]
    rows = _merged(_depth_rows(depth_files), _width_rows(width_files))
    dense = _dense(width_files)["params"]
    print("| config | params | removed | ppl | ppl healed |")
    print("|---|---|---|---|---|")
    for r in rows:
        removed = 1 - r["params"] / dense
        healed = f"{r['ppl_healed']:.2f}" if "ppl_healed" in r else "-"
        print(f"| {r['config']} | {r['params'] / 1e6:.1f} M | {removed:.1%} | {r['ppl']:.2f} | {healed} |")
    if args.plot:  # the frontier's plot, by parameters: one line per method (named "line level")
        sys.path.insert(0, os.path.dirname(__file__))
        from width_frontier import plot

        results = {"dense": _dense(width_files)}
        results.update({f"{r['line']} {i}": r for i, r in enumerate(rows)})
        plot(results, args.plot, f"{title}: depth at every block count vs width (dashed: healed)", by_params=True)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
